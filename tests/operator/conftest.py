"""Fixtures for the operator's tools: real ``modeld serve`` subprocesses (the C loop: the
page, the CLI, reload, audit and traces do not depend on the token loop)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.http import ServerFactory
from tests.support.server import RunningServer, start_modeld

DEFAULTS = ("--threads", "1", "--n-ctx", "256", "--token-loop", "c")


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[ServerFactory]:
    """Start servers with the defaults above (flags given later win); stop them all."""
    started: list[RunningServer] = []

    def start(models_dir: Path, *flags: str) -> RunningServer:
        server = start_modeld(models_dir, tmp_path, *DEFAULTS, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.stop()
