"""Ordinary use that broke the server (issue 7), each through a real ``modeld serve``:
answers cut by a transport timer, a client that sends and leaves at once, HTTP/2 streams
reset at once, ``--no-mmap``, a client leaving mid-body, SIGTERM with event streams open,
running out of file descriptors, and prompts whose tokenization costs more than their
length suggests."""

from __future__ import annotations

import json
import resource
import signal
import socket
import struct
import threading
import time
from pathlib import Path

import h2.config
import h2.connection
import h2.events
import httpx
import pytest

from modeld.server import hypercorn_config
from modeld.settings.config import load_settings
from tests.support.http import GEMMA, ServerFactory, connect, instance_of, poll
from tests.support.server import RunningServer

TINY = ["tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"]
PUA_CHAR = "\U000e0041"  # a tag character: Gemma's tokenizer falls back to 4 byte tokens


def log_records(server: RunningServer) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def all_idle(server: RunningServer) -> dict[str, object]:
    """``/status`` once nothing is admitted, queued or running (bounded wait)."""
    with server.client() as client:

        def idle(status: dict[str, object]) -> bool:
            instances = status["instances"]
            assert isinstance(instances, list)
            busy = [i for i in instances if i["inflight"] or i["queue_len"]]
            return status["admitted"] == 0 and status["running"] == 0 and not busy

        return poll(lambda: dict(client.get("/status").json()), idle, timeout_s=300)


def serves(server: RunningServer, model: str) -> None:
    with server.client(timeout_s=30) as client:
        response = client.post(
            "/infer", json={"model": model, "prompt": "hi", "max_tokens": 2, "stream": False}
        )
    assert response.status_code == 200, response.text
    assert response.json()["metrics"]["completion_tokens"] == 2


# --- transport timers ---------------------------------------------------------------


def test_no_read_timeout_is_configured() -> None:
    """Hypercorn's read timeout also runs while a client waits for its answer."""
    config = hypercorn_config(load_settings({"idle_timeout": "7"}, env={}))
    assert config.read_timeout is None
    assert config.keep_alive_timeout == 7


def test_the_idle_timeout_closes_idle_connections_but_not_an_open_answer(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--idle-timeout", "1")
    with connect(server, timeout_s=10) as idle:
        started_s = time.monotonic()
        assert idle.recv(1) == b""  # closed by the server's idle timer
        assert time.monotonic() - started_s < 5
    with server.client() as client, server.client() as admin:
        with client.stream("GET", "/events") as response:
            lines = response.iter_lines()
            assert next(lines) == ": connected"
            time.sleep(3)  # three idle timeouts with nothing sent either way
            assert admin.post("/models/tiny-a.gguf/load").status_code == 200
            kinds = []
            for line in lines:
                if line.startswith("event: "):
                    kinds.append(line.removeprefix("event: "))
                if kinds and kinds[-1] == "model_ready":
                    break
        assert kinds[0] == "model_load_started"


@pytest.mark.slow
@pytest.mark.parametrize("token_loop_kind", ["c"])
def test_answers_and_waits_longer_than_thirty_seconds_are_not_cut(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    """The old 30 s read timeout cut streams, queued requests and event streams. With
    the default transport settings: a stream runs past 30 s and ends with its terminal
    line (cancelled on purpose at 32 s), a request queued behind it for over 30 s is
    answered, and an event stream open all along still delivers."""
    server = start_server(
        gemma_dir, "--default-model", GEMMA, "--threads", "1", "--n-ctx", "8192",
        "--max-wait-ms", "120000", "--prewarm-default",
    )  # fmt: skip
    counting = {"prompt": "Count from 1 to 9000: 1, 2, 3,", "max_tokens": 8000, "temperature": 0}
    stream_lines: list[tuple[float, dict[str, object]]] = []
    queued: list[httpx.Response] = []
    events: list[tuple[float, str]] = []
    started_s = time.monotonic()

    def stream() -> None:
        with server.client(timeout_s=300) as client:
            headers = {"X-Request-ID": "long-1"}
            with client.stream("POST", "/infer", json=counting, headers=headers) as response:
                for line in response.iter_lines():
                    stream_lines.append((time.monotonic() - started_s, json.loads(line)))

    def wait_in_queue() -> None:
        with server.client(timeout_s=300) as client:
            body = {"prompt": "Hi", "max_tokens": 2, "stream": False}
            queued.append(client.post("/infer", json=body))

    def subscribe() -> None:
        with server.client(timeout_s=300) as client, client.stream("GET", "/events") as sse:
            for line in sse.iter_lines():
                if line.startswith("event: "):
                    events.append((time.monotonic() - started_s, line.removeprefix("event: ")))
                    if line.endswith("model_evicted"):
                        return

    threads = [threading.Thread(target=target) for target in (subscribe, stream)]
    for thread in threads:
        thread.start()
    poll(lambda: len(stream_lines), lambda n: n > 0, timeout_s=30)
    waiter = threading.Thread(target=wait_in_queue)
    waiter.start()
    time.sleep(32)  # past the old limit, with every client silent
    with server.client() as admin:
        assert all(not line.get("done") for _, line in stream_lines), "ended before 32 s"
        assert admin.delete("/requests/long-1").status_code == 200
        waiter.join(timeout=120)
        threads[1].join(timeout=60)
        assert admin.delete(f"/models/{GEMMA}/instance").status_code == 200
    threads[0].join(timeout=60)
    terminal = [line for _, line in stream_lines if line.get("done")]
    assert len(terminal) == 1
    assert terminal[0]["done_reason"] == "cancelled"
    assert stream_lines[-1][0] > 32
    assert queued[0].status_code == 200
    assert queued[0].json()["metrics"]["queue_ms"] > 30_000
    assert events[-1][1] == "model_evicted"
    assert events[-1][0] > 32


# --- clients that leave at once ---------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
def test_a_request_sent_and_abandoned_at_once_wedges_no_model(
    start_server: ServerFactory, models_dir: Path, stream: bool, reset: bool
) -> None:
    server = start_server(models_dir, "--max-wait-ms", "3000")
    for model in TINY:
        serves(server, model)  # loaded and idle: the fast path of the queue
    for _ in range(5):
        for model in TINY:
            sock = server.open_infer({"model": model, "prompt": "hi", "stream": stream})
            if reset:  # RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    all_idle(server)
    for model in TINY:
        serves(server, model)


def h2_request(conn: h2.connection.H2Connection, model: str) -> int:
    body = json.dumps({"model": model, "prompt": "hi", "max_tokens": 4}).encode()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(
        stream_id,
        [
            (":method", "POST"), (":path", "/infer"), (":scheme", "http"),
            (":authority", "127.0.0.1"), ("content-type", "application/json"),
            ("content-length", str(len(body))),
        ],
    )  # fmt: skip
    conn.send_data(stream_id, body, end_stream=True)
    return stream_id


def h2_read_until_ended(
    sock: socket.socket, conn: h2.connection.H2Connection, stream_id: int
) -> tuple[int, bytes]:
    status, body = 0, b""
    while True:
        data = sock.recv(65536)
        assert data, "the server closed the HTTP/2 connection"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream_id:
                status = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                if event.stream_id == stream_id:
                    body += event.data
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                sock.sendall(conn.data_to_send())
                return status, body
        sock.sendall(conn.data_to_send())


def test_http2_streams_reset_right_after_their_request_wedge_no_model(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--max-wait-ms", "3000")
    for model in TINY:
        serves(server, model)
    with socket.create_connection(server.address, timeout=30) as sock:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()  # h2c with prior knowledge
        for _ in range(10):
            for model in TINY:
                conn.reset_stream(h2_request(conn, model))
        sock.sendall(conn.data_to_send())
        kept = h2_request(conn, "tiny-a.gguf")  # one left to finish: the server speaks h2c
        sock.sendall(conn.data_to_send())
        status, body = h2_read_until_ended(sock, conn, kept)
    assert status == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[-1]["done"] is True
    all_idle(server)
    for model in TINY:
        serves(server, model)


# --- --no-mmap --------------------------------------------------------------------------


def mapped_files(server: RunningServer) -> str:
    return Path(f"/proc/{server.process.pid}/maps").read_text()


def test_no_mmap_reads_the_weights_into_memory(
    start_server: ServerFactory, models_dir: Path
) -> None:
    mapped = start_server(models_dir)
    read = start_server(models_dir, "--no-mmap")
    for server in (mapped, read):
        serves(server, "tiny-a.gguf")
    model_path = str(models_dir / "tiny-a.gguf")
    assert model_path in mapped_files(mapped)  # the control: mmap is the default
    assert model_path not in mapped_files(read)


# --- a client that leaves mid-body -------------------------------------------------------


def test_a_client_leaving_mid_body_is_a_499_not_a_server_error(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with connect(server) as sock:
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: gone-1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            b'{"prompt": "'
        )
    record = poll(
        lambda: [r for r in log_records(server) if r.get("request_id") == "gone-1"],
        lambda records: any(r.get("message") == "request" for r in records),
    )
    access = next(r for r in record if r.get("message") == "request")
    assert access["status"] == 499
    assert not any(r.get("level") == "error" for r in record)
    with server.client() as client:
        metrics = client.get("/metrics").text
    assert 'path="/infer",status="499"' in metrics
    assert 'status="500"' not in metrics
    serves(server, "tiny-a.gguf")


# --- SIGTERM with event streams open ------------------------------------------------------


def read_sse_to_end(sock: socket.socket) -> bytes:
    data = b""
    while part := sock.recv(65536):
        data += part
    return data


def test_sigterm_ends_open_event_streams_cleanly(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--shutdown-grace", "0.5")
    serves(server, "tiny-a.gguf")
    subscribers = []
    for _ in range(3):
        sock = connect(server)
        sock.sendall(b"GET /events HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        head = b""
        while b": connected" not in head:
            part = sock.recv(65536)
            assert part, head
            head += part
        subscribers.append(sock)
    started_s = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    bodies = [read_sse_to_end(sock) for sock in subscribers]
    for sock in subscribers:
        sock.close()
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - started_s < 0.5 + 10  # the grace, the close bound, slack
    for body in bodies:
        assert b"event: model_evicted" in body  # the shutdown's own unload, then the end
        assert body.endswith(b"0\r\n\r\n")  # a complete chunked body, not a cut one
    log = server.log()
    assert "Traceback" not in log
    assert "CancelledError" not in log
    assert all(line.startswith("{") for line in log.splitlines() if line.strip())


# --- out of file descriptors ------------------------------------------------------------


def open_fds(server: RunningServer) -> int:
    return len(list(Path(f"/proc/{server.process.pid}/fd").iterdir()))


def test_running_out_of_descriptors_degrades_and_recovers(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf", "--idle-timeout", "60")
    pid = server.process.pid
    with server.client() as client:  # one keep-alive connection, opened before the shortage
        assert client.post("/models/tiny-a.gguf/load").status_code == 200
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_fds(server) + 4, hard))
        flood = [connect(server, timeout_s=5) for _ in range(40)]  # idle: they hold fds
        try:
            poll(lambda: '"event loop error"' in server.log(), bool)
            unload = client.delete("/models/tiny-a.gguf/instance")
            assert unload.status_code == 200  # waiting on a worker needs no descriptor
            status = client.get("/status").json()
            assert status["instances"] == []
            assert status["used_est_mb"] == 0
            refused = client.post("/infer", json={"prompt": "hi", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.json()["error"]["code"] == "resources_exhausted"
            assert "retry-after" in refused.headers
            time.sleep(3)  # the accept loop keeps failing meanwhile
        finally:
            for sock in flood:
                sock.close()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    serves(server, "tiny-a.gguf")  # resources back: served again, no cooldown
    loop_errors = [r for r in log_records(server) if r.get("message") == "event loop error"]
    assert 1 <= len(loop_errors) <= 3  # rate-limited (asyncio retries the accept every 1 s)
    assert all(line.startswith("{") for line in server.log().splitlines() if line.strip())


# --- prompts whose tokenization is expensive ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("token_loop_kind", ["c"])
def test_a_prompt_over_the_byte_budget_is_refused_before_tokenizing(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    """A megabyte of byte-fallback characters kept Gemma's tokenizer busy for seconds."""
    server = start_server(
        gemma_dir, "--default-model", GEMMA, "--n-ctx", "4096", "--max-body-bytes", "2000000",
        "--prewarm-default",
    )  # fmt: skip
    with server.client() as client:
        started_s = time.monotonic()
        response = client.post("/infer", json={"prompt": PUA_CHAR * 250_000, "max_tokens": 1})
        took_s = time.monotonic() - started_s
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["field"] == "prompt"
        assert "bytes" in error["message"]
        instance = instance_of(client, GEMMA)
        assert instance is not None
        assert instance["inflight"] == 0
    assert took_s < 5  # no multi-second tokenization behind the answer
    serves(server, GEMMA)


@pytest.mark.slow
@pytest.mark.parametrize("token_loop_kind", ["c"])
def test_status_shows_the_model_busy_while_a_left_request_is_tokenized(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    """Within the byte budget a pathological prompt still takes seconds to tokenize; the
    client leaving must not make the model look idle meanwhile."""
    server = start_server(
        gemma_dir, "--default-model", GEMMA, "--n-ctx", "16384", "--max-body-bytes",
        "3000000", "--prewarm-default",
    )  # fmt: skip
    body = json.dumps({"prompt": PUA_CHAR * 190_000, "max_tokens": 1}, ensure_ascii=False)
    payload = body.encode()  # 760 KB: inside the budget of 16384 tokens x 48 bytes
    with connect(server) as sock:
        sock.sendall(
            b"POST /infer HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Request-ID: left-1\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(0.5)  # the worker has the prompt (tokenizing it takes seconds)
    poll(  # the server has seen the client leave: the request is over for it
        lambda: [r for r in log_records(server) if r.get("request_id") == "left-1"],
        lambda records: any(r.get("message") == "request" for r in records),
    )
    with server.client() as client:
        instance = instance_of(client, GEMMA)
        assert instance is not None
        assert instance["inflight"] == 1  # busy while the worker still tokenizes
    all_idle(server)
    serves(server, GEMMA)
