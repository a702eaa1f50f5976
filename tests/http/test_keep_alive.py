"""Idle unload through a real server: --keep-alive, keep_alive on /infer, the expiry in
/status, the idle reason in /events and /metrics. Only keep-alives of 0 and "never" are
used here (no test waits for a clock); the expiry itself is tested on a manual clock in
tests/scheduling/test_keep_alive.py."""

from __future__ import annotations

import time
from pathlib import Path

from tests.http.test_observability import sse_events
from tests.support.http import ServerFactory, instance_of, poll

MODEL = "tiny-a.gguf"
ASK = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "temperature": 0, "stream": False}


def test_keep_alive_zero_unloads_after_each_request(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--keep-alive", "0")
    with server.client() as client, server.client() as watcher:
        with watcher.stream("GET", "/events") as events:
            lines = events.iter_lines()
            assert next(lines) == ": connected"
            assert client.post("/infer", json=ASK).json()["done_reason"] == "length"
            evicted = next(data for kind, data in sse_events(lines) if kind == "model_evicted")
        assert (evicted["model"], evicted["reason"]) == (MODEL, "idle")
        poll(lambda: instance_of(client, MODEL), lambda instance: instance is None)
        metrics = client.get("/metrics").text
        assert f'modeld_unloads_total{{model="{MODEL}",reason="idle"}} 1.0' in metrics
        assert f'modeld_evictions_total{{model="{MODEL}"}} 0.0' in metrics
        # a request that asks for longer keeps it, whatever the default
        client.post("/infer", json={**ASK, "keep_alive": "1h"})
        instance = instance_of(client, MODEL)
        assert instance is not None
        assert instance["keep_alive_seconds"] == 3600
        assert isinstance(instance["expires_at"], float)
        assert 3500 < instance["expires_at"] - time.time() <= 3600


def test_status_shows_the_expiry_and_infer_checks_the_field(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        assert client.post("/infer", json=ASK).status_code == 200
        instance = instance_of(client, MODEL)
        assert instance is not None
        assert instance["keep_alive_seconds"] == 300  # the default, as Ollama's
        assert isinstance(instance["expires_at"], float)
        assert 240 < instance["expires_at"] - time.time() <= 300
        client.post("/infer", json={**ASK, "keep_alive": -1})
        instance = instance_of(client, MODEL)
        assert instance is not None
        assert instance["keep_alive_seconds"] is None
        assert instance["expires_at"] is None
        refused = client.post("/infer", json={**ASK, "keep_alive": "a while"})
        assert refused.status_code == 400
        assert refused.json()["error"]["field"] == "keep_alive"
