"""A real modeld server (Hypercorn, subprocess) on 127.0.0.1 and a free port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from modeld.server import free_port

SRC = Path(__file__).resolve().parents[2] / "src"


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=60, **kwargs)  # type: ignore[arg-type]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM through our own process handle, then wait for a clean exit."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)


ServerFactory = Callable[..., RunningServer]


@pytest.fixture
def start_server(tmp_path: Path, token_loop_kind: str) -> Iterator[ServerFactory]:
    started: list[RunningServer] = []

    def start(models_dir: Path, *flags: str) -> RunningServer:
        port = free_port()
        log_path = tmp_path / f"server-{port}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        command = [
            sys.executable, "-m", "modeld.cli", "serve",
            "--models-dir", str(models_dir),
            "--host", "127.0.0.1", "--port", str(port),
            "--threads", "1", "--n-ctx", "256",
            "--token-loop", str(token_loop_kind),
            *flags,
        ]  # fmt: skip
        with log_path.open("wb") as log:
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
        started.append(server)
        _wait_until_listening(server)
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait()


def _wait_until_listening(server: RunningServer, attempts: int = 300) -> None:
    for _ in range(attempts):
        if server.process.poll() is not None:
            raise RuntimeError(f"modeld exited early:\n{server.log()}")
        try:
            if httpx.get(server.base_url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)  # polling for the port to open, not a synchronisation sleep
    raise RuntimeError(f"modeld did not start listening:\n{server.log()}")
