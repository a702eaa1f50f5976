"""Models for the scale-out tests; Ray itself is only started by test_serve.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

LONG_CONTEXT = 2048
FOUR_MODELS = ["long-a.gguf", "long-b.gguf", "long-c.gguf", "long-d.gguf"]


@pytest.fixture
def anyio_backend() -> str:
    """Ray Serve runs replicas on asyncio, and so does the bridge into them."""
    return "asyncio"


@pytest.fixture(scope="session")
def long_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four ~11 MB models (distinct weights) with a 2048-token context: big enough for
    megabyte budgets, long enough for a stream that is still running when a test acts."""
    directory = tmp_path_factory.mktemp("long-models")
    for index, name in enumerate(FOUR_MODELS):
        spec = TinyModelSpec(
            n_embd=256, n_ff=512, n_layer=4, seed=20 + index, context_length=LONG_CONTEXT
        )
        write_tiny_gguf(directory / name, spec)
    return directory
