"""End to end on the real Gemma 3 270M: streaming, backpressure, disconnects."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from modeld.testing.server import RunningServer
from tests.api.conftest import ServerFactory

GEMMA = "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture
def gemma_server(start_server: ServerFactory, tmp_path: Path, gemma_path: Path) -> RunningServer:
    models = tmp_path / "gemma-models"
    models.mkdir()
    try:
        os.link(gemma_path, models / GEMMA)  # same file, no 250 MB copy per test
    except OSError:
        shutil.copyfile(gemma_path, models / GEMMA)
    return start_server(
        models, "--default-model", GEMMA, "--threads", "2", "--n-ctx", "1024",
        "--max-queue-depth", "1", "--shutdown-grace", "1",
    )  # fmt: skip


def wait_until_idle(client: httpx.Client, attempts: int = 200) -> dict[str, object]:
    """Poll /status until no instance runs or queues anything (bounded)."""
    for _ in range(attempts):
        status = client.get("/status").json()
        if all(i["inflight"] == 0 and i["queue_len"] == 0 for i in status["instances"]):
            return dict(status)
        time.sleep(0.05)
    raise AssertionError(f"still busy: {status}")


def test_gemma_streams_real_text(gemma_server: RunningServer) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 24, "temperature": 0}
    with gemma_server.client() as client:
        response = client.post("/infer", json=body)
    lines = [json.loads(line) for line in response.text.splitlines()]
    text = "".join(str(line.get("text", "")) for line in lines[:-1])
    assert "France" in text or "Paris" in text  # a 270M model: on topic, if not always right
    assert lines[-1]["done"] is True
    assert lines[-1]["done_reason"] in {"stop", "length"}
    assert lines[-1]["metrics"]["completion_tokens"] >= 1


def test_stop_string_is_never_emitted(gemma_server: RunningServer) -> None:
    body = {"prompt": "Count: 1, 2, 3,", "max_tokens": 40, "temperature": 0}
    with gemma_server.client() as client:
        free = client.post("/infer", json={**body, "stream": False}).json()
        stop = free["text"].strip()[2:5]  # a piece from the middle of the greedy text
        assert stop
        cut = client.post("/infer", json={**body, "stream": False, "stop": [stop]}).json()
    assert cut["done_reason"] == "stop"
    assert stop not in cut["text"]
    assert free["text"].startswith(cut["text"])


def wait_for_queue_len(client: httpx.Client, expected: int, attempts: int = 400) -> None:
    for _ in range(attempts):
        instances = client.get("/status").json()["instances"]
        if instances and instances[0]["queue_len"] == expected:
            return
        time.sleep(0.02)
    raise AssertionError(f"queue never reached {expected}")


def test_queue_full_gets_429_with_retry_after_and_disconnects_free_the_model(
    gemma_server: RunningServer,
) -> None:
    long_body = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7}
    with gemma_server.client() as client:
        client.post("/infer", json={"prompt": "hi", "max_tokens": 1})  # loaded and warm
        running = gemma_server.open_infer(long_body)
        assert running.recv(64).startswith(b"HTTP/1.1 200")  # the generation runs
        queued = gemma_server.open_infer(long_body)
        wait_for_queue_len(client, 1)
        refused = client.post("/infer", json=long_body)  # depth 1: refused at once
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        queued.close()  # the queued client leaves: it leaves the queue
        wait_for_queue_len(client, 0)
        running.close()  # the streaming client leaves: its generation is cancelled
        status = wait_until_idle(client)
        (instance,) = status["instances"]  # type: ignore[misc]
        assert instance["state"] == "ready"
        after = client.post("/infer", json={"prompt": "hi", "max_tokens": 2, "stream": False})
        assert after.status_code == 200
        assert after.json()["done_reason"] == "length"


def test_unload_mid_stream_ends_with_evicted(gemma_server: RunningServer) -> None:
    body = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7}
    with gemma_server.client() as client:
        with client.stream("POST", "/infer", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            assert client.delete(f"/models/{GEMMA}/instance").status_code == 200
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done"] is True
        assert rest[-1]["done_reason"] == "evicted"
        assert rest[-1]["metrics"]["completion_tokens"] < 900


def test_cancel_by_request_id(gemma_server: RunningServer) -> None:
    body = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7}
    with gemma_server.client() as client:
        headers = {"X-Request-ID": "story-1"}
        with client.stream("POST", "/infer", json=body, headers=headers) as response:
            lines = response.iter_lines()
            next(lines)
            assert client.delete("/requests/story-1").status_code == 200
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done_reason"] == "cancelled"
        unknown = client.delete("/requests/story-1")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "request_not_found"


def test_sigterm_mid_stream_ends_with_terminal_line(gemma_server: RunningServer) -> None:
    body = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7}
    with gemma_server.client() as client, client.stream("POST", "/infer", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        gemma_server.process.send_signal(15)
        rest = [json.loads(line) for line in lines]
    assert rest[-1]["done"] is True
    assert rest[-1]["done_reason"] in {"shutdown", "length", "stop"}
    assert gemma_server.process.wait(timeout=60) == 0


def test_log_lines_written_during_a_load_are_not_lost(gemma_server: RunningServer) -> None:
    """llama-cpp-python points fd 2 at /dev/null while it loads a model; modeld's log sink
    writes to its own copy of stderr, so requests served meanwhile are still logged."""
    loader = threading.Thread(
        target=lambda: httpx.post(f"{gemma_server.base_url}/models/{GEMMA}/load", timeout=120)
    )
    sent = 0
    with gemma_server.client() as client:
        loader.start()
        while loader.is_alive() or sent == 0:
            assert client.get("/models").status_code == 200
            sent += 1
        loader.join()
        client.get("/healthz")
    logged = 0
    for _ in range(100):  # the last lines may still be on their way to the file
        logged = sum(1 for line in gemma_server.log().splitlines() if '"route":"/models"' in line)
        if logged >= sent:
            break
        time.sleep(0.05)
    assert logged == sent
