"""A lean blocking HTTP client for benchmarks: one raw socket per request, one orjson
parse per NDJSON line, so that the client's own CPU (on the server's cores) disturbs the
measurement as little as possible."""

from __future__ import annotations

import re
import socket
import time
from dataclasses import dataclass
from typing import Any

import orjson

__all__ = ["Answer", "chat", "infer"]

_FIRST_CONTENT = re.compile(rb'"delta":\{[^}]*"content":"[^"]')  # not the role chunk's ""


@dataclass(frozen=True)
class Answer:
    """One /infer request as the client saw it."""

    seconds: float  # from sending the request to the terminal line (or the whole body)
    first_line_s: float  # from sending to the first NDJSON line (streams; 0 otherwise)
    lines: int  # chunk lines before the terminal one (streams)
    text: str
    metrics: dict[str, Any]


def infer(base_url: str, body: dict[str, Any]) -> Answer:
    """POST /infer and read the answer to its end (``Connection: close``)."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = orjson.dumps(body)
    head = (
        f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    stream = bool(body.get("stream", True))
    with socket.create_connection((host, int(port))) as sock:
        started = time.perf_counter()
        sock.sendall(head + payload)
        return _read_stream(sock, started) if stream else _read_whole(sock, started)


def _read_stream(sock: socket.socket, started: float) -> Answer:
    buffer = b""
    headers_done = False
    first_line_s = 0.0
    parts: list[str] = []
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the stream ended without a terminal line")
        buffer += data
        if not headers_done:
            if b"\r\n\r\n" not in buffer:
                continue
            status = buffer.split(b"\r\n", 1)[0]
            if b" 200 " not in status:
                raise ConnectionError(status.decode())
            buffer = buffer.split(b"\r\n\r\n", 1)[1]
            headers_done = True
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"{"):
                continue  # chunked-encoding size lines
            if not first_line_s:
                first_line_s = time.perf_counter() - started
            record = orjson.loads(line)
            if record.get("done"):
                seconds = time.perf_counter() - started
                return Answer(seconds, first_line_s, len(parts), "".join(parts), record["metrics"])
            parts.append(record["text"])


def _read_whole(sock: socket.socket, started: float) -> Answer:
    received = bytearray()
    while data := sock.recv(65536):
        received += data
    seconds = time.perf_counter() - started
    head, body = bytes(received).split(b"\r\n\r\n", 1)
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        raise ConnectionError(head.decode())
    record = orjson.loads(body)
    return Answer(seconds, 0.0, 0, record["text"], record["metrics"])


def chat(base_url: str, body: dict[str, Any]) -> Answer:
    """POST /v1/chat/completions streamed, with the usage chunk, read to ``[DONE]``;
    ``metrics`` is OpenAI's ``usage``, ``first_line_s`` the time to the first content."""
    host, port = base_url.removeprefix("http://").split(":")
    payload = orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        started = time.perf_counter()
        sock.sendall(head + payload)
        received = b""
        first_s = 0.0
        while data := sock.recv(65536):
            received += data
            if not first_s and _FIRST_CONTENT.search(received):
                first_s = time.perf_counter() - started
        seconds = time.perf_counter() - started
    head_bytes, body_bytes = received.split(b"\r\n\r\n", 1)
    if b" 200 " not in head_bytes.split(b"\r\n", 1)[0]:
        raise ConnectionError(head_bytes.decode())
    events = [
        orjson.loads(line[len(b"data: ") :])
        for line in body_bytes.split(b"\n")
        if line.startswith(b"data: {")
    ]
    if b"data: [DONE]" not in body_bytes:
        raise ConnectionError("the stream ended without [DONE]")
    text = "".join(
        event["choices"][0]["delta"].get("content") or "" for event in events if event["choices"]
    )
    usage = next(event["usage"] for event in events if event.get("usage"))
    return Answer(seconds, first_s, len(events), text, usage)
