"""A real modeld server (Hypercorn, subprocess) on 127.0.0.1 and a free port."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from modeld.testing.server import RunningServer, start_modeld

__all__ = ["RunningServer", "ServerFactory"]

ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def start_server(tmp_path: Path, token_loop_kind: str) -> Iterator[ServerFactory]:
    started: list[RunningServer] = []

    def start(models_dir: Path, *flags: str) -> RunningServer:
        defaults = ("--threads", "1", "--n-ctx", "256", "--token-loop", str(token_loop_kind))
        server = start_modeld(models_dir, tmp_path, *defaults, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()
