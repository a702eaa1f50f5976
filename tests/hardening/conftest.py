"""Fixtures and helpers for the hardening suite: real servers, raw sockets, bounded polls.

Every server here is a real ``modeld serve`` subprocess (``tests/api/conftest.py``);
raw sockets are used where httpx would normalise away the input under test.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from modeld.testing.server import RunningServer, start_modeld
from tests.api.conftest import ServerFactory, start_server

__all__ = [
    "GEMMA",
    "RawResponse",
    "ServerFactory",
    "link_or_copy",
    "ndjson",
    "poll",
    "raw_exchange",
    "start_server",
]

GEMMA = "gemma-3-270m-q4_k_m.gguf"
T = TypeVar("T")
SERVER_DEFAULTS = ("--threads", "1", "--n-ctx", "256", "--token-loop", "python")


@dataclass(frozen=True)
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names; the last value wins
    body: bytes

    def json(self) -> dict[str, object]:
        data = json.loads(self.body)
        assert isinstance(data, dict)
        return data

    def error_code(self) -> str:
        error = self.json()["error"]
        assert isinstance(error, dict)
        return str(error["code"])


def address(server: RunningServer) -> tuple[str, int]:
    host, port = server.base_url.removeprefix("http://").split(":")
    return host, int(port)


def connect(server: RunningServer, timeout_s: float = 30) -> socket.socket:
    return socket.create_connection(address(server), timeout=timeout_s)


def read_response(sock: socket.socket) -> RawResponse:
    """One HTTP/1.1 response (Content-Length or close-delimited; no chunked bodies)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"closed before a complete response head: {data!r}")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = read_chunked(sock, body)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        while len(body) < length:
            part = sock.recv(65536)
            if not part:
                break
            body += part
    else:
        while part := sock.recv(65536):
            body += part
    return RawResponse(int(status_line.split(" ")[1]), headers, body)


def read_chunked(sock: socket.socket, data: bytes) -> bytes:
    """Decode a chunked body whose first bytes are ``data``."""
    body = b""
    while True:
        while b"\r\n" not in data:
            data += sock.recv(65536) or b"\r\n"
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0] or b"0", 16)
        if size == 0:
            return body
        while len(data) < size + 2:
            part = sock.recv(65536)
            if not part:
                return body + data[:size]
            data += part
        body, data = body + data[:size], data[size + 2 :]


def raw_exchange(server: RunningServer, request: bytes, timeout_s: float = 30) -> RawResponse:
    """Send exact bytes on a fresh connection and read one response."""
    with connect(server, timeout_s) as sock:
        sock.sendall(request)
        return read_response(sock)


def http_request(
    method: str,
    target: str,
    *,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    host: str = "127.0.0.1",
) -> bytes:
    """Request bytes with ``target`` sent as given (no normalisation of ``..`` or ``%2e``)."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    if body or method in {"POST", "PUT"}:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def ndjson(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line]


def poll(
    probe: Callable[[], T], done: Callable[[T], bool], attempts: int = 400, every_s: float = 0.025
) -> T:
    """Call ``probe`` until ``done(value)``; bounded (fails with the last value)."""
    value = probe()
    for _ in range(attempts):
        if done(value):
            return value
        time.sleep(every_s)  # polling interval, not synchronisation
        value = probe()
    raise AssertionError(f"condition never met; last value: {value!r}")


def instance_of(client: httpx.Client, model_id: str) -> dict[str, object] | None:
    for instance in client.get("/status").json()["instances"]:
        if instance["model_id"] == model_id:
            return dict(instance)
    return None


def link_or_copy(source: Path, target: Path) -> Path:
    try:
        os.link(source, target)  # same file, no 250 MB copy per test
    except OSError:
        shutil.copyfile(source, target)
    return target


@pytest.fixture
def gemma_dir(tmp_path: Path, gemma_path: Path) -> Path:
    directory = tmp_path / "gemma-models"
    directory.mkdir()
    link_or_copy(gemma_path, directory / GEMMA)
    return directory


@pytest.fixture(scope="module")
def module_server_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., RunningServer]]:
    """Servers that live for a whole module (for tables of cheap probes)."""
    started: list[RunningServer] = []
    log_dir = tmp_path_factory.mktemp("module-server-logs")

    def start(models_dir: Path, *flags: str) -> RunningServer:
        server = start_modeld(models_dir, log_dir, *SERVER_DEFAULTS, *flags)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
