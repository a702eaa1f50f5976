"""Fixtures for the end-to-end HTTP suite: real ``modeld serve`` subprocesses.

Every test here runs once per token loop (the C loop and its Python twin): the loop is a
module-scoped parameter, so a module's shared server (``module_server_factory``, for
tables of cheap probes) starts once per loop, and ``start_server`` starts a fresh one per
test. Servers listen on 127.0.0.1 and a free port and are stopped through their own
process handle.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modeld.types import LoopKind
from tests.support.http import ServerFactory
from tests.support.openai_clients import close_openai_clients
from tests.support.server import RunningServer, start_modeld


@pytest.fixture(scope="session", autouse=True)
def openai_clients_closed() -> Iterator[None]:
    yield
    close_openai_clients()


@pytest.fixture(scope="module", params=[LoopKind.C, LoopKind.PYTHON], ids=str)
def token_loop_kind(request: pytest.FixtureRequest) -> LoopKind:
    """Overrides the function-scoped parameter of ``tests/conftest.py`` for this suite."""
    return LoopKind(request.param)


@contextlib.contextmanager
def _servers(log_dir: Path, loop: LoopKind) -> Iterator[ServerFactory]:
    """Start servers with the suite's defaults (flags given later win); stop them all."""
    started: list[RunningServer] = []
    defaults = ("--threads", "1", "--n-ctx", "256", "--token-loop", str(loop))

    def start(models_dir: Path, *flags: str) -> RunningServer:
        server = start_modeld(models_dir, log_dir, *defaults, *flags)
        started.append(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            with contextlib.suppress(subprocess.TimeoutExpired):  # it ignored SIGTERM: killed
                server.stop()


@pytest.fixture
def start_server(tmp_path: Path, token_loop_kind: LoopKind) -> Iterator[ServerFactory]:
    """Servers for one test."""
    with _servers(tmp_path, token_loop_kind) as start:
        yield start


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory, token_loop_kind: LoopKind
) -> Iterator[ServerFactory]:
    """Servers that live for a whole module and loop (for tables of cheap probes)."""
    with _servers(tmp_path_factory.mktemp("module-server-logs"), token_loop_kind) as start:
        yield start


@pytest.fixture(scope="module")
def module_models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A models dir for a module's shared server, holding a copy of tiny-a.gguf.

    Shared by the module's servers for both loops: fill it in fixtures that do not depend
    on the loop, so that it is filled once.
    """
    directory = tmp_path_factory.mktemp("module-models")
    shutil.copyfile(tiny_model_dir / "tiny-a.gguf", directory / "tiny-a.gguf")
    return directory


@pytest.fixture(scope="module")
def client(server: RunningServer) -> Iterator[httpx.Client]:
    """A client of the module's shared ``server`` (a fixture the module defines)."""
    with server.client() as client:
        yield client
