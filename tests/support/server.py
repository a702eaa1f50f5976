"""Start a real ``modeld serve`` in a subprocess on 127.0.0.1 and a free port.

For tests and benchmarks: the server is stopped through its own process handle (SIGTERM,
then a bounded wait), never by name.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

import modeld
from tests.support.poll import poll

__all__ = ["RunningServer", "free_port", "start_modeld"]

# The server runs the same modeld this process imported (a checkout or an install).
_MODELD_ROOT = Path(modeld.__file__).resolve().parents[1]


@dataclass
class RunningServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path

    def client(self, timeout_s: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.base_url.removeprefix("http://").rsplit(":", 1)
        return host, int(port)

    def open_infer(self, body: dict[str, object]) -> socket.socket:
        """Send ``POST /infer`` on a raw socket and return it unread: a client that waits
        (queued or streaming) and may later leave by closing it."""
        payload = json.dumps(body).encode()
        sock = socket.create_connection(self.address, timeout=60)
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        return sock

    def pause(self) -> None:
        """SIGSTOP by its own PID (benchmarks: the other side runs alone meanwhile)."""
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.process.send_signal(signal.SIGCONT)

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, then wait for the exit status (killed only if it does not exit)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def start_modeld(
    models_dir: Path,
    log_dir: Path,
    *flags: str,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """Start the server and return once ``/healthz`` answers.

    ``port``: a given one (a restart on the same address) instead of a free one; ``env``:
    variables added to this process's environment.
    """
    port = port or free_port()
    log_path = log_dir / f"modeld-{port}.log"
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_MODELD_ROOT), env.get("PYTHONPATH")]))
    command = [
        sys.executable, "-m", "modeld.cli", "serve",
        "--models-dir", str(models_dir), "--host", "127.0.0.1", "--port", str(port),
        *flags,
    ]  # fmt: skip
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = RunningServer(process, f"http://127.0.0.1:{port}", log_path)
    _wait_until_listening(server)
    return server


def _wait_until_listening(server: RunningServer, timeout_s: float = 60.0) -> None:
    def answered() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"modeld exited early:\n{server.log()}")
        return httpx.get(server.base_url + "/healthz", timeout=1).status_code == 200

    try:
        poll(answered, timeout_s=timeout_s, every_s=0.05, retry_on=(httpx.TransportError,))
    except AssertionError:
        server.stop()
        raise RuntimeError(f"modeld did not start listening:\n{server.log()}") from None
