"""End to end on the real Gemma 3 270M: streaming, stop strings, backpressure,
disconnects, unloads and cancels mid-stream."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.http import GEMMA, GEMMA_FLAGS, LONG_STORY, ServerFactory, poll
from tests.support.server import RunningServer

pytestmark = pytest.mark.slow


@pytest.fixture
def gemma_server(start_server: ServerFactory, gemma_dir: Path) -> RunningServer:
    return start_server(
        gemma_dir, *GEMMA_FLAGS,
        "--max-queue-depth", "1", "--shutdown-grace", "1",
    )  # fmt: skip


def wait_until_idle(client: httpx.Client) -> dict[str, object]:
    """Poll /status until no instance runs or queues anything (bounded)."""

    def idle(status: dict[str, object]) -> bool:
        instances = status["instances"]
        assert isinstance(instances, list)
        return all(i["inflight"] == 0 and i["queue_len"] == 0 for i in instances)

    return poll(lambda: dict(client.get("/status").json()), idle)


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


def wait_for_queue_len(client: httpx.Client, expected: int) -> None:
    poll(
        lambda: client.get("/status").json()["instances"],
        lambda instances: bool(instances) and instances[0]["queue_len"] == expected,
    )


def test_queue_full_gets_429_with_retry_after_and_disconnects_free_the_model(
    gemma_server: RunningServer,
) -> None:
    with gemma_server.client() as client:
        client.post("/infer", json={"prompt": "hi", "max_tokens": 1})  # loaded and warm
        running = gemma_server.open_infer(LONG_STORY)
        assert running.recv(64).startswith(b"HTTP/1.1 200")  # the generation runs
        queued = gemma_server.open_infer(LONG_STORY)
        wait_for_queue_len(client, 1)
        refused = client.post("/infer", json=LONG_STORY)  # depth 1: refused at once
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
    with gemma_server.client() as client:
        with client.stream("POST", "/infer", json=LONG_STORY) as response:
            lines = response.iter_lines()
            next(lines)
            assert client.delete(f"/models/{GEMMA}/instance").status_code == 200
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done"] is True
        assert rest[-1]["done_reason"] == "evicted"
        assert rest[-1]["metrics"]["completion_tokens"] < 900


def test_cancel_by_request_id(gemma_server: RunningServer) -> None:
    with gemma_server.client() as client:
        headers = {"X-Request-ID": "story-1"}
        with client.stream("POST", "/infer", json=LONG_STORY, headers=headers) as response:
            lines = response.iter_lines()
            next(lines)
            assert client.delete("/requests/story-1").status_code == 200
            rest = [json.loads(line) for line in lines]
        assert rest[-1]["done_reason"] == "cancelled"
        unknown = client.delete("/requests/story-1")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "request_not_found"
