"""Flags that bound the server, each through the real server: CORS, prewarm/readiness,
``--max-body-bytes``, ``--infer-timeout``, ``--max-inflight``."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.support.http import (
    GEMMA,
    GEMMA_FLAGS,
    LONG_STORY,
    ServerFactory,
    instance_of,
    ndjson,
    poll,
)

ORIGIN = "http://a.example"


def preflight(client: httpx.Client, origin: str) -> httpx.Response:
    return client.options(
        "/infer",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )


def test_cors_is_off_by_default(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        simple = client.get("/healthz", headers={"Origin": ORIGIN})
        assert "access-control-allow-origin" not in simple.headers
        options = preflight(client, ORIGIN)
        assert options.status_code == 405  # no CORS layer: OPTIONS is just a wrong method
        assert "access-control-allow-origin" not in options.headers


def test_cors_origins_enable_it_for_listed_origins_only(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--cors-origins", ORIGIN)
    with server.client() as client:
        allowed = preflight(client, ORIGIN)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in allowed.headers["access-control-allow-methods"]
        refused = preflight(client, "http://evil.example")
        assert refused.status_code == 400
        assert "access-control-allow-origin" not in refused.headers
        simple = client.get("/healthz", headers={"Origin": ORIGIN})
        assert simple.headers["access-control-allow-origin"] == ORIGIN
        assert "x-request-id" in simple.headers["access-control-expose-headers"].lower()
        other = client.get("/healthz", headers={"Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_cors_does_not_bypass_the_host_check(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--cors-origins", ORIGIN)
    with server.client() as client:
        response = client.post(
            "/infer",
            json={"prompt": "x", "model": "tiny-a.gguf"},
            headers={"Origin": ORIGIN, "Host": "rebind.example"},
        )
    assert response.status_code == 403


def test_prewarm_default_is_ready_before_any_request(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf", "--prewarm-default")
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
        entry = instance_of(client, "tiny-a.gguf")
        assert entry is not None
        assert entry["state"] == "ready"
        assert entry["loads_total"] == 1


def test_without_prewarm_ready_only_after_a_request(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with server.client() as client:
        assert client.get("/readyz").status_code == 503
        assert client.get("/status").json()["instances"] == []
        client.post("/infer", json={"prompt": "hi", "max_tokens": 1})
        assert client.get("/readyz").status_code == 200


def test_readiness_follows_the_default_model_not_any_model(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with server.client() as client:
        client.post("/infer", json={"prompt": "hi", "model": "tiny-b.gguf", "max_tokens": 1})
        assert client.get("/readyz").status_code == 503
        client.delete("/models/tiny-b.gguf/instance")
        client.post("/models/tiny-a.gguf/load")
        assert client.get("/readyz").status_code == 200
        client.delete("/models/tiny-a.gguf/instance")
        assert client.get("/readyz").status_code == 503


def test_max_body_bytes(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf", "--max-body-bytes", "2048")
    small = json.dumps({"prompt": "x" * 1900, "max_tokens": 1, "stream": False}).encode()
    with server.client() as client:
        too_big = client.post("/infer", json={"prompt": "x" * 3000})
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        fits = client.post("/infer", content=small)
        assert fits.status_code != 413  # (a 1900-char prompt is over this n_ctx: 400)


# --- with Gemma: generations long enough to time out, and to hold the in-flight cap -----


@pytest.mark.slow
def test_infer_timeout_ends_a_stream_with_timeout(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = start_server(
        gemma_dir, *GEMMA_FLAGS,
        "--infer-timeout", "0.5",
    )  # fmt: skip
    with server.client() as client:
        assert client.post(f"/models/{GEMMA}/load").status_code == 200  # the load is not timed
        lines = ndjson(client.post("/infer", json=LONG_STORY).text)
    terminal = lines[-1]
    assert terminal["done"] is True
    assert terminal["done_reason"] == "timeout"
    assert terminal["metrics"]["completion_tokens"] < 900  # type: ignore[index]
    assert sum(1 for line in lines if line.get("done")) == 1


def test_waiting_past_the_infer_timeout_is_504(
    start_server: ServerFactory, medium_model_dir: Path, tmp_path: Path
) -> None:
    """A request that never starts within --infer-timeout (here: waiting for memory that a
    pinned model holds; --max-wait-ms is longer and does not bind) gets 504."""
    directory = tmp_path / "medium"
    directory.mkdir()
    for name in ["med-a.gguf", "med-b.gguf"]:
        (directory / name).write_bytes((medium_model_dir / name).read_bytes())
    server = start_server(
        directory, "--vram-budget-mb", "30", "--vram-margin-mb", "0",
        "--infer-timeout", "1", "--max-wait-ms", "60000",
    )  # fmt: skip
    with server.client() as client:
        pinned = client.post("/models/med-a.gguf/load", json={"pin": True})
        assert pinned.status_code == 200
        waited = client.post("/infer", json={"prompt": "hi", "model": "med-b.gguf"})
        assert waited.status_code == 504, waited.text
        assert waited.json()["error"]["code"] == "infer_timeout"


def test_max_inflight_refuses_the_second_request(
    start_server: ServerFactory, medium_model_dir: Path, tmp_path: Path
) -> None:
    """The first request is admitted and waits (for memory a pinned model holds), so it is
    in flight for as long as the test needs, without timing."""
    directory = tmp_path / "medium"
    directory.mkdir()
    for name in ["med-a.gguf", "med-b.gguf"]:
        (directory / name).write_bytes((medium_model_dir / name).read_bytes())
    server = start_server(
        directory, "--vram-budget-mb", "30", "--vram-margin-mb", "0", "--max-inflight", "1",
        "--max-wait-ms", "60000",
    )  # fmt: skip
    with server.client() as client:
        assert client.post("/models/med-a.gguf/load", json={"pin": True}).status_code == 200
        waiting = server.open_infer({"prompt": "hi", "model": "med-b.gguf"})
        with waiting:
            poll(lambda: client.get("/status").json()["admitted"], lambda n: n == 1)
            refused = client.post("/infer", json={"prompt": "hi", "model": "med-a.gguf"})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_inflight"
            assert int(refused.headers["retry-after"]) >= 1
            assert client.delete("/models/med-a.gguf/instance").status_code == 200
            assert waiting.recv(64).startswith(b"HTTP/1.1 200")  # the memory came back
        poll(lambda: client.get("/status").json()["admitted"], lambda n: n == 0)
        after = client.post("/infer", json={"prompt": "hi", "model": "med-b.gguf", "max_tokens": 1})
        assert after.status_code == 200
