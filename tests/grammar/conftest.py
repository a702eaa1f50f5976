from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_cpp import Llama


@pytest.fixture(scope="session")
def vocab_llama(tiny_model_path: Path) -> Iterator[Llama]:
    """tiny-a's vocabulary only: what llama.cpp's grammar parser needs."""
    llama = Llama(str(tiny_model_path), vocab_only=True, verbose=False)
    yield llama
    llama.close()
