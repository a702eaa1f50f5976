"""HTTP transport abuse through the real Hypercorn server: body size, slow heads, Host
headers, unknown routes, request ids, malformed framing. The server stays up after each."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modeld.api.middleware import MAX_HEADER_BYTES, MAX_HEADER_COUNT
from tests.support.http import (
    ServerFactory,
    connect,
    http_request,
    raw_exchange,
    read_response,
)
from tests.support.server import RunningServer

MAX_BODY_BYTES = 4096


@pytest.fixture(scope="module")
def server(module_models_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        module_models_dir, "--default-model", "tiny-a.gguf", "--max-body-bytes", str(MAX_BODY_BYTES)
    )


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    """Per test, and the server must still serve after it."""
    with server.client() as client:
        yield client
    assert_still_serving(server)


def assert_still_serving(server: RunningServer) -> None:
    with httpx.Client(base_url=server.base_url, timeout=30) as fresh:
        assert fresh.get("/healthz").status_code == 200
        done = fresh.post("/infer", json={"prompt": "ok", "max_tokens": 1, "stream": False})
        assert done.status_code == 200
        assert done.json()["done_reason"] == "length"


def oversized_json() -> bytes:
    return json.dumps({"prompt": "x" * (2 * MAX_BODY_BYTES)}).encode()


def test_body_over_the_limit_is_refused_from_content_length(server: RunningServer) -> None:
    head = http_request("POST", "/infer", headers={"Content-Type": "application/json"})
    head = head.replace(b"Content-Length: 0", f"Content-Length: {10 * MAX_BODY_BYTES}".encode())
    with connect(server) as sock:
        sock.sendall(head)  # the body is never sent: the answer must not wait for it
        response = read_response(sock)
    assert (response.status, response.error_code()) == (413, "payload_too_large")
    assert_still_serving(server)


def test_chunked_body_over_the_limit_is_refused(client: httpx.Client) -> None:
    def chunks() -> Iterator[bytes]:
        body = oversized_json()
        for start in range(0, len(body), 1000):
            yield body[start : start + 1000]

    response = client.post("/infer", content=chunks())  # no Content-Length: chunked
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


def test_chunked_body_under_the_limit_is_served(client: httpx.Client) -> None:
    body = json.dumps({"prompt": "hello", "max_tokens": 1, "stream": False}).encode()
    response = client.post("/infer", content=iter([body[:10], body[10:]]))
    assert response.status_code == 200
    assert response.json()["done_reason"] == "length"


def test_early_413_closes_the_connection_explicitly(server: RunningServer) -> None:
    head = http_request("POST", "/infer").replace(b"Connection: close\r\n", b"")
    head = head.replace(b"Content-Length: 0", f"Content-Length: {10 * MAX_BODY_BYTES}".encode())
    with connect(server) as sock:
        sock.sendall(head)
        response = read_response(sock)
    assert response.status == 413
    assert response.headers.get("connection", "").lower() == "close"


def test_slowloris_head_is_closed_by_the_server(server: RunningServer) -> None:
    """A request head trickled one byte at a time never completes: Hypercorn's
    keep-alive timer (5 s from accept) closes the connection. Bounded at 20 s."""
    head = http_request("GET", "/healthz") + b"X-Padding: " + b"p" * 100
    closed = False
    with connect(server, timeout_s=1) as sock:
        for byte in head:
            try:
                sock.sendall(bytes([byte]))
                if sock.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue  # the byte's pacing: nothing came back within a second
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
    assert closed, "the server kept a never-ending request head open"
    assert_still_serving(server)


def test_idle_connection_is_closed(server: RunningServer) -> None:
    with connect(server, timeout_s=20) as sock:
        assert sock.recv(1) == b""  # closed by the server, not by our 20 s bound


def test_slow_body_gets_408(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--body-timeout", "0.5")
    with connect(server) as sock:
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{"
        )  # then nothing more: a client that trickles or stalls its body
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 408")
    assert b'"request_timeout"' in reply
    with server.client() as client:
        assert client.get("/healthz").status_code == 200


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 403),
        ("evil.example:8080", 403),
        ("127.0.0.1.evil.example", 403),
        ("localhost.evil.example", 403),
        ("10.0.0.1", 403),
        ("[::2]", 403),
        ("127.0.0.1", 200),
        ("127.0.0.1:1", 200),
        ("localhost", 200),
        ("LOCALHOST:8080", 200),
        ("[::1]:8080", 200),
        ("127.1.2.3", 200),
    ],
)
def test_host_header(server: RunningServer, host: str, status: int) -> None:
    response = raw_exchange(server, http_request("GET", "/healthz", host=host))
    assert response.status == status, response.body
    if status == 403:
        assert response.error_code() == "forbidden_host"
        assert "x-request-id" in response.headers


def test_foreign_host_gets_403_on_every_route(client: httpx.Client) -> None:
    headers = {"Host": "rebind.example"}
    for method, path in [("POST", "/infer"), ("GET", "/status"), ("DELETE", "/models/x/instance")]:
        response = client.request(method, path, headers=headers, json={"prompt": "x"})
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "forbidden_host"


def test_missing_host_header_is_refused(server: RunningServer) -> None:
    request = b"GET /healthz HTTP/1.1\r\nConnection: close\r\n\r\n"
    with connect(server) as sock:
        sock.sendall(request)
        data = b""
        while part := sock.recv(65536):
            data += part
    assert data.startswith(b"HTTP/1.1 400")  # h11 requires Host on HTTP/1.1


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/infer/extra", 404, "not_found"),
        ("GET", "/models/a.gguf", 404, "not_found"),
        ("GET", "/infer", 405, "method_not_allowed"),
        ("PUT", "/models", 405, "method_not_allowed"),
        ("DELETE", "/healthz", 405, "method_not_allowed"),
        ("PATCH", "/status", 405, "method_not_allowed"),
        ("GET", "/models/tiny-a.gguf/load", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods(
    client: httpx.Client, method: str, path: str, status: int, code: str
) -> None:
    response = client.request(method, path)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


@pytest.mark.parametrize(
    "given",
    [
        "",
        "x" * 129,
        "has space",
        "semi;colon",
        "../../etc/passwd",
        "<script>",
        'quote"d',
        "caf\xe9",  # latin-1 bytes on the wire
        "a\x01b",  # h11 lets control characters other than CR/LF/NUL through
    ],
    ids=["empty", "129-chars", "space", "semicolon", "path", "html", "quote", "non-ascii", "ctl"],
)
def test_insane_request_id_is_replaced(server: RunningServer, given: str) -> None:
    response = raw_exchange(server, http_request("GET", "/nope", headers={"X-Request-ID": given}))
    made = response.headers["x-request-id"]
    assert made != given
    assert len(made) == 32
    assert made.isalnum()
    assert response.json()["error"]["request_id"] == made  # type: ignore[index]


def test_missing_request_id_is_made(client: httpx.Client) -> None:
    made = client.get("/healthz").headers["x-request-id"]
    assert len(made) == 32
    assert made.isalnum()
    assert client.get("/healthz").headers["x-request-id"] != made


@pytest.mark.parametrize("given", ["a", "req-42", "A.b_c:d-e", "x" * 128])
def test_sane_request_id_is_echoed(client: httpx.Client, given: str) -> None:
    response = client.get("/nope", headers={"X-Request-ID": given})
    assert response.headers["x-request-id"] == given
    assert response.json()["error"]["request_id"] == given


@pytest.mark.parametrize(
    ("name", "request_bytes", "status"),
    [
        pytest.param(
            "content-length-negative",
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
            400,
            id="content-length-negative",
        ),
        pytest.param(
            "content-length-twice-differing",
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
            b"Content-Length: 3\r\n\r\n{}",
            400,
            id="content-length-twice-differing",
        ),
        pytest.param(
            "bad-chunk-size",
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"zz\r\n{}\r\n0\r\n\r\n",
            400,
            id="bad-chunk-size",
        ),
        pytest.param(
            "nul-in-target",
            b"GET /heal\x00thz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            400,
            id="nul-in-target",
        ),
        pytest.param(
            "header-block-70kb",
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"b" * 70_000 + b"\r\n\r\n",
            431,
            id="header-block-70kb",
        ),
    ],
)
def test_malformed_framing_is_refused(
    server: RunningServer, name: str, request_bytes: bytes, status: int
) -> None:
    with connect(server) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request_bytes)  # may be refused while we are still sending
        data = b""
        try:
            while part := sock.recv(65536):
                data += part
        except ConnectionResetError:
            pass
    assert data.startswith(f"HTTP/1.1 {status}".encode()), (name, data[:200])
    assert_still_serving(server)


def test_many_idle_connections_do_not_block_a_request(server: RunningServer) -> None:
    sockets = [connect(server, timeout_s=5) for _ in range(200)]
    try:
        assert_still_serving(server)
    finally:
        for sock in sockets:
            sock.close()


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({f"x-h{i}": "v" for i in range(5000)}, "5002 header lines are over the 100"),
        ({f"x-h{i}": "v" for i in range(MAX_HEADER_COUNT)}, "header lines are over the 100"),
        ({"x-big": "v" * 60_000}, f"bytes of headers are over the {MAX_HEADER_BYTES}"),
        ({"x-big": "v" * MAX_HEADER_BYTES}, f"bytes of headers are over the {MAX_HEADER_BYTES}"),
    ],
    ids=["5000-small", "just-over-count", "60-kb-in-one-piece", "just-over-size"],
)
def test_a_header_block_over_the_caps_is_a_431_even_in_one_piece(
    server: RunningServer, headers: dict[str, str], words: str
) -> None:
    refused = raw_exchange(server, http_request("GET", "/healthz", headers=headers))
    assert refused.status == 431
    error = refused.json()["error"]
    assert isinstance(error, dict)
    assert error["code"] == "headers_too_large"
    assert words in str(error["message"])
    assert refused.headers["connection"] == "close"
    near = {f"x-h{i}": "v" for i in range(MAX_HEADER_COUNT - 3)}  # Host, Connection: 2 more
    assert raw_exchange(server, http_request("GET", "/healthz", headers=near)).status == 200
