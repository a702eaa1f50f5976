"""Fixtures for the token loops and rings: every behavioural test runs on both twins."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_cpp import Llama

from modeld.engine.base import TokenLoop
from modeld.engine.select import token_loop
from modeld.types import LoopKind
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

TINY_N_CTX = 512
GEMMA_N_CTX = 1024


def _load(path: Path, n_ctx: int, n_threads: int) -> Llama:
    return Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=n_threads, verbose=False)


@pytest.fixture(params=[LoopKind.C, LoopKind.PYTHON], ids=str)
def loop(request: pytest.FixtureRequest) -> TokenLoop:
    """The C loop and its pure-Python twin, in turn."""
    return token_loop(request.param)


@pytest.fixture
def c_loop() -> TokenLoop:
    return token_loop(LoopKind.C)


@pytest.fixture
def py_loop() -> TokenLoop:
    return token_loop(LoopKind.PYTHON)


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_path: Path) -> Iterator[Llama]:
    """tiny-a with one thread; shared, since every loop run starts from an empty KV cache."""
    llama = _load(tiny_model_path, TINY_N_CTX, n_threads=1)
    yield llama
    llama.close()


@pytest.fixture(scope="session")
def tiny_llama_b(tiny_model_dir: Path) -> Iterator[Llama]:
    llama = _load(tiny_model_dir / "tiny-b.gguf", TINY_N_CTX, n_threads=1)
    yield llama
    llama.close()


@pytest.fixture(scope="session")
def tiny_llama_with_eos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Llama]:
    """A tiny model that can sample its end-of-generation token."""
    path = tmp_path_factory.mktemp("tiny-eos") / "tiny-eos.gguf"
    write_tiny_gguf(path, TinyModelSpec(seed=5, suppress_eos=False))
    llama = _load(path, TINY_N_CTX, n_threads=1)
    yield llama
    llama.close()


@pytest.fixture(scope="session")
def gemma_llama(gemma_path: Path) -> Iterator[Llama]:
    llama = _load(gemma_path, GEMMA_N_CTX, n_threads=2)
    yield llama
    llama.close()
