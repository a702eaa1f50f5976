"""The documented routes through a real Hypercorn server and real llama.cpp: health and
readiness, the model list, streamed and whole generations, ``/status``."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.http import ServerFactory, ndjson
from tests.support.server import RunningServer

TERMINAL_METRICS = {
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "queue_ms",
    "load_ms",
    "ttft_ms",
    "prompt_eval_ms",
    "eval_ms",
    "total_ms",
    "tokens_per_second",
}


@pytest.fixture
def server(start_server: ServerFactory, models_dir: Path) -> RunningServer:
    return start_server(models_dir, "--default-model", "tiny-a.gguf")


def test_health_readiness_and_models(server: RunningServer) -> None:
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").status_code == 503  # default model not loaded yet
        models = client.get("/models").json()["models"]
        assert [m["id"] for m in models] == ["tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"]
        assert {m["state"] for m in models} == {"unloaded"}
        assert all(Path(str(m["path"])).is_absolute() and m["size_bytes"] > 0 for m in models)
        client.post("/infer", json={"prompt": "hi", "max_tokens": 1})
        assert client.get("/readyz").status_code == 200
        states = {m["id"]: m["state"] for m in client.get("/models").json()["models"]}
        assert states["tiny-a.gguf"] == "ready"


def test_streaming_ndjson(server: RunningServer) -> None:
    body = {"prompt": "hello", "model": "tiny-b.gguf", "max_tokens": 20, "temperature": 0}
    with server.client() as client:
        response = client.post("/infer", json=body, headers={"X-Request-ID": "req-42"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.headers["x-request-id"] == "req-42"
    lines = ndjson(response.text)
    terminal = [line for line in lines if line.get("done")]
    assert len(terminal) == 1
    assert lines[-1] is terminal[0]
    chunks = lines[:-1]
    assert chunks
    assert all(set(c) == {"text", "tokens"} for c in chunks)
    done = terminal[0]
    assert done["done_reason"] == "length"
    assert done["model"] == "tiny-b.gguf"
    assert done["request_id"] == "req-42"
    metrics = done["metrics"]
    assert isinstance(metrics, dict)
    assert set(metrics) == TERMINAL_METRICS
    assert metrics["completion_tokens"] == 20 == sum(int(c["tokens"]) for c in chunks)  # type: ignore[call-overload]


def test_non_streaming(server: RunningServer) -> None:
    body = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": False}
    with server.client() as client:
        first = client.post("/infer", json=body)
        streamed = ndjson(client.post("/infer", json={**body, "stream": True}).text)
    assert first.headers["content-type"] == "application/json"
    result = first.json()
    assert result["done"] is True
    assert result["done_reason"] == "length"
    assert result["model"] == "tiny-a.gguf"  # the default model
    assert result["metrics"]["completion_tokens"] == 8
    assert result["text"] == "".join(str(line["text"]) for line in streamed[:-1])


def test_status(server: RunningServer) -> None:
    with server.client() as client:
        client.post("/infer", json={"prompt": "hi", "max_tokens": 2})
        status = client.get("/status").json()
    for key in ["budget_mb", "margin_mb", "used_est_mb", "server_time_unix", "uptime_seconds"]:
        assert key in status
    assert status["token_loop"] in {"c", "python"}
    (instance,) = status["instances"]
    assert instance["model_id"] == "tiny-a.gguf"
    assert instance["state"] == "ready"
    for key in [
        "last_used",
        "est_vram_mb",
        "queue_len",
        "inflight",
        "loads_total",
        "evictions_total",
        "last_error",
        "uptime_seconds",
    ]:
        assert key in instance
    assert instance["loads_total"] == 1
    assert instance["est_vram_mb"] > 0
