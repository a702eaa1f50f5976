"""A native ``llama-server`` process for benchmarks, and a lean client for its streamed
``POST /completion``: the counterpart of ``tests.support.server`` and
``benchmarks.raw_client`` on llama.cpp's side.

The process listens on 127.0.0.1 and a free port; it is paused, resumed and stopped
through its own process handle (SIGSTOP/SIGCONT/SIGTERM to its PID), never by name. A
router (``--models-dir``) starts one child process per model; pausing the router's PID
alone would leave them running, so a router is started in its own process group and
paused as a group (by the group id the router's own PID names).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
from benchmarks.raw_client import Answer
from tests.support.poll import poll
from tests.support.server import free_port

from modeld.engine.cpu_quirks import extra_buffers_enabled

__all__ = ["LlamaServer", "completion", "default_flags", "server_flags", "start_llama_server"]

READY_TIMEOUT_S = 180.0


@dataclass
class LlamaServer:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    router: bool

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)

    def _signal(self, signum: int) -> None:
        if self.process.poll() is not None:
            return
        if self.router:  # the router and its model processes: its own group
            os.killpg(self.process.pid, signum)
        else:
            self.process.send_signal(signum)

    def stop(self, timeout_s: float = 30) -> None:
        """SIGCONT (a paused process cannot exit), SIGTERM, a bounded wait, then kill."""
        self.resume()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self._kill()
        if self.router:  # children left behind by a router that did not stop them
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def _kill(self) -> None:
        if self.router:
            os.killpg(self.process.pid, signal.SIGKILL)
        else:
            self.process.kill()
        self.process.wait()

    def model_ids(self) -> list[str]:
        data = httpx.get(self.base_url + "/v1/models", timeout=10).json()
        return [str(entry["id"]) for entry in data.get("data", [])]


def server_flags(threads: int, n_ctx: int) -> list[str]:
    """The flags that make llama-server run what modeld runs: the same threads for
    decode and prompt, the context, one slot, and llama.cpp's extra weight buffers off
    where modeld turns them off (``cpu_quirks``)."""
    flags = ["-t", str(threads), "-tb", str(threads), "-c", str(n_ctx), "-np", "1"]
    return flags + default_flags()


def default_flags() -> list[str]:
    """What every llama-server here gets: no web UI, and llama.cpp's extra weight
    buffers off where modeld turns them off (``cpu_quirks``: AMX hosts)."""
    return ["--no-webui"] if extra_buffers_enabled() else ["--no-webui", "--no-repack"]


def start_llama_server(
    binary: Path,
    log_dir: Path,
    *,
    model: Path | None = None,
    models_dir: Path | None = None,
    flags: Sequence[str] = (),
) -> LlamaServer:
    """One model (``model``) or the router over ``models_dir``; returns once ``/health``
    answers 200 (a single model is loaded by then)."""
    port = free_port()
    log_path = log_dir / f"llama-server-{port}.log"
    source = ["-m", str(model)] if model is not None else ["--models-dir", str(models_dir)]
    command = [str(binary), *source, "--host", "127.0.0.1", "--port", str(port), *flags]
    router = model is None
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=router
        )
    server = LlamaServer(process, f"http://127.0.0.1:{port}", log_path, router)

    def healthy() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited early:\n{log_path.read_text()[-2000:]}")
        return httpx.get(server.base_url + "/health", timeout=2).status_code == 200

    try:
        poll(healthy, timeout_s=READY_TIMEOUT_S, every_s=0.1, retry_on=(httpx.TransportError,))
    except BaseException:
        server.stop()
        raise
    return server


def completion(base_url: str, body: dict[str, Any]) -> Answer:
    """Streamed ``POST /completion`` read to the event with ``"stop": true``
    (``Connection: close``): the same measures as ``raw_client.infer`` takes of modeld.
    ``metrics`` is llama-server's ``timings`` object."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = orjson.dumps({**body, "stream": True})
    head = (
        f"POST /completion HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        started = time.perf_counter()
        sock.sendall(head + payload)
        return _read_events(sock, started)


def _read_events(sock: socket.socket, started: float) -> Answer:
    raw = b""
    body = b""
    chunked: bool | None = None  # None: headers not read yet
    first_s = 0.0
    parts: list[str] = []
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("llama-server's stream ended without a stop event")
        raw += data
        if chunked is None:
            if b"\r\n\r\n" not in raw:
                continue
            head, raw = raw.split(b"\r\n\r\n", 1)
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head.decode(errors="replace"))
            chunked = b"transfer-encoding: chunked" in head.lower()
        if chunked:
            taken, raw = _dechunk(raw)
            body += taken
        else:
            body, raw = body + raw, b""
        *lines, body = body.split(b"\n")
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            if not first_s:
                first_s = time.perf_counter() - started
            event = orjson.loads(line[len(b"data: ") :])
            parts.append(event.get("content", ""))
            if event.get("stop"):
                seconds = time.perf_counter() - started
                timings = event.get("timings", {})
                return Answer(seconds, first_s, len(parts), "".join(parts), timings)


def _dechunk(raw: bytes) -> tuple[bytes, bytes]:
    """The payload of the complete chunks at the start of ``raw``, and what is left (a
    router relays its model process's stream in chunks that may split an event)."""
    payload = b""
    while b"\r\n" in raw:
        size_line, rest = raw.split(b"\r\n", 1)
        size = int(size_line.split(b";", 1)[0] or b"0", 16)
        if len(rest) < size + 2:
            break
        payload += rest[:size]
        raw = rest[size + 2 :]
    return payload, raw
