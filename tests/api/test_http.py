"""The HTTP API through a real Hypercorn server and real llama.cpp."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import pytest

from tests.api.conftest import RunningServer, ServerFactory

TERMINAL_METRICS = {
    "prompt_tokens",
    "completion_tokens",
    "queue_ms",
    "load_ms",
    "ttft_ms",
    "prompt_eval_ms",
    "eval_ms",
    "total_ms",
    "tokens_per_second",
}


def ndjson(response: httpx.Response) -> list[dict[str, object]]:
    return [json.loads(line) for line in response.text.splitlines() if line]


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
    lines = ndjson(response)
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
        streamed = ndjson(client.post("/infer", json={**body, "stream": True}))
    assert first.headers["content-type"] == "application/json"
    result = first.json()
    assert result["done"] is True
    assert result["done_reason"] == "length"
    assert result["model"] == "tiny-a.gguf"  # the default model
    assert result["metrics"]["completion_tokens"] == 8
    assert result["text"] == "".join(str(line["text"]) for line in streamed[:-1])


def test_request_id_is_made_when_missing_or_insane(server: RunningServer) -> None:
    with server.client() as client:
        made = client.get("/healthz").headers["x-request-id"]
        insane = client.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert len(made) == 32
    assert insane.headers["x-request-id"] != "bad id\twith spaces"


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


BAD_INPUTS = [
    # (body bytes, status, error code, field named)
    (b"{", 400, "bad_request", None),
    (b"", 400, "bad_request", None),
    (b"[]", 400, "bad_request", None),
    (b"\xff\xfe", 400, "bad_request", None),
    (b'{"max_tokens": 5}', 400, "bad_request", "prompt"),
    (b'{"prompt": 5}', 400, "bad_request", "prompt"),
    (b'{"prompt": "x", "max_tokens": "5"}', 400, "bad_request", "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 0}', 400, "bad_request", "max_tokens"),
    (b'{"prompt": "x", "max_tokens": 100000}', 400, "bad_request", "max_tokens"),
    (b'{"prompt": "x", "temperature": NaN}', 400, "bad_request", None),
    (b'{"prompt": "x", "temperature": 1e999}', 400, "bad_request", "temperature"),
    (b'{"prompt": "x", "temperature": 2.5}', 400, "bad_request", "temperature"),
    (b'{"prompt": "x", "top_p": 1.5}', 400, "bad_request", "top_p"),
    (b'{"prompt": "x", "top_k": -1}', 400, "bad_request", "top_k"),
    (b'{"prompt": "x", "min_p": -0.1}', 400, "bad_request", "min_p"),
    (b'{"prompt": "x", "repeat_penalty": 0}', 400, "bad_request", "repeat_penalty"),
    (b'{"prompt": "x", "seed": 18446744073709551616}', 400, "bad_request", "seed"),
    (b'{"prompt": "x", "stop": ["a", 1]}', 400, "bad_request", "stop"),
    (b'{"prompt": "x", "n_discard": -5}', 400, "bad_request", "n_discard"),
    (b'{"prompt": "x", "model": "nope.gguf"}', 404, "model_not_found", None),
    (b'{"prompt": "x", "model": "../etc/passwd"}', 400, "invalid_model_id", "model"),
    (b'{"prompt": "x", "model": "/abs/x.gguf"}', 400, "invalid_model_id", "model"),
    (b'{"prompt": "x", "model": "a\\u0000b.gguf"}', 400, "invalid_model_id", "model"),
    (b'{"prompt": "x", "model": "notes.txt"}', 400, "invalid_model_id", "model"),
    (b'{"prompt": "x", "model": "dir.gguf"}', 404, "model_not_found", None),
    (b'{"prompt": "x", "model": "corrupt.gguf"}', 422, "model_invalid", None),
]


def test_bad_inputs_get_documented_errors_and_the_server_stays_up(
    start_server: ServerFactory, models_dir: Path
) -> None:
    (models_dir / "dir.gguf").mkdir()
    (models_dir / "corrupt.gguf").write_bytes(b"NOTAGGUF" + os.urandom(64))
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with server.client() as client:
        for body, status, code, field in BAD_INPUTS:
            response = client.post(
                "/infer", content=body, headers={"content-type": "application/json"}
            )
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == code, (body, error)
            assert error["message"]
            assert error["request_id"] == response.headers["x-request-id"]
            if field is not None:
                assert error.get("field") == field, (body, error)
            assert client.get("/healthz").status_code == 200
        too_big = client.post("/infer", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        assert client.get("/nope").json()["error"]["code"] == "not_found"
        assert client.get("/infer").status_code == 405
        foreign = client.get("/healthz", headers={"host": "evil.example"})
        assert foreign.status_code == 403
        assert foreign.json()["error"]["code"] == "forbidden_host"
        ok = client.post("/infer", json={"prompt": "still fine", "max_tokens": 2})
        assert ok.status_code == 200


def test_empty_models_dir(start_server: ServerFactory, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty)
    with server.client() as client:
        assert client.get("/models").json() == {"models": []}
        missing = client.post("/infer", json={"prompt": "x", "model": "a.gguf"})
        assert missing.status_code == 404
        no_default = client.post("/infer", json={"prompt": "x"})
        assert no_default.status_code == 400
        assert no_default.json()["error"]["code"] == "no_default_model"
        assert client.get("/readyz").status_code == 503


def test_sigterm_exits_cleanly(server: RunningServer) -> None:
    with server.client() as client:
        client.post("/infer", json={"prompt": "hi", "max_tokens": 2})
    assert server.stop() == 0


def test_slow_body_gets_408(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--body-timeout", "0.5")
    host, port = server.base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
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
