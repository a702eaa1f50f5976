"""Helpers for the end-to-end HTTP suite: raw sockets, NDJSON, bounded polls, Gemma.

Raw sockets are used where httpx would normalise away the input under test (``%2e%2e``
in a path, a missing Host header, malformed framing).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx

from tests.support.poll import poll
from tests.support.server import RunningServer

__all__ = [
    "GEMMA",
    "GEMMA_FLAGS",
    "LONG_STORY",
    "RawResponse",
    "ServerFactory",
    "connect",
    "http_request",
    "instance_of",
    "link_or_copy",
    "ndjson",
    "poll",
    "raw_exchange",
    "read_response",
]

GEMMA = "gemma-3-270m-q4_k_m.gguf"
GEMMA_FLAGS = ("--default-model", GEMMA, "--threads", "2", "--n-ctx", "1024")
# Long enough on Gemma to still be running when a test acts on it.
LONG_STORY = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7}
T = TypeVar("T")
ServerFactory = Callable[..., RunningServer]  # start(models_dir, *flags), the fixtures' type


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


def connect(server: RunningServer, timeout_s: float = 30) -> socket.socket:
    return socket.create_connection(server.address, timeout=timeout_s)


def read_response(sock: socket.socket) -> RawResponse:
    """One HTTP/1.1 response (Content-Length, chunked or close-delimited)."""
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
        body = _read_chunked(sock, body)
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


def _read_chunked(sock: socket.socket, data: bytes) -> bytes:
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
