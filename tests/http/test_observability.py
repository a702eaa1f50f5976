"""Metrics, logs and lifecycle events through the real server: Prometheus text that moves
as requests run, JSON access logs without prompts (unless asked for), and ``/events``."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.http import GEMMA, GEMMA_FLAGS, LONG_STORY, ServerFactory, poll
from tests.support.server import RunningServer

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\})? (\S+)$')


def scrape(client: httpx.Client) -> dict[str, float]:
    """``name{labels}`` -> value, from the Prometheus text format (labels sorted)."""
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = SAMPLE.match(line)
        assert match, line
        name, labels, value = match.groups()
        if labels:
            pairs = sorted(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels))
            name += "{" + ",".join(f'{k}="{v}"' for k, v in pairs) + "}"
        samples[name] = float(value)
    return samples


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    key = name
    if labels:
        key += "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    return samples.get(key, 0.0)


def test_metrics_move_as_requests_run(start_server: ServerFactory, models_dir: Path) -> None:
    # A budget for one tiny model at a time: loading tiny-b evicts tiny-a.
    server = start_server(
        models_dir, "--default-model", "tiny-a.gguf", "--vram-budget-mb", "12",
        "--vram-margin-mb", "0",
    )  # fmt: skip
    infer = {"labels": {"path": "/infer", "method": "POST", "status": "200"}}
    with server.client() as client:
        before = scrape(client)
        assert metric(before, "modeld_budget_mb") == 12
        assert metric(before, "modeld_http_requests_total", **infer["labels"]) == 0
        client.post("/infer", json={"prompt": "hi", "max_tokens": 5})
        client.post("/infer", json={"prompt": "hi", "max_tokens": 7, "stream": False})
        after = scrape(client)
        a = {"model": "tiny-a.gguf"}
        assert metric(after, "modeld_http_requests_total", **infer["labels"]) == 2
        assert metric(after, "modeld_tokens_generated_total", **a) == 12
        assert metric(after, "modeld_time_to_first_token_seconds_count", **a) == 2
        assert metric(after, "modeld_time_to_first_token_seconds_bucket", le="600.0", **a) == 2
        assert metric(after, "modeld_http_request_duration_seconds_bucket", le="600.0",
                      **infer["labels"]) == 2  # fmt: skip
        assert metric(after, "modeld_generations_total", done_reason="length", **a) == 2
        assert metric(after, "modeld_loads_total", **a) == 1
        assert metric(after, "modeld_load_duration_seconds_count", **a) == 1
        assert metric(after, "modeld_loaded_bytes", **a) > 0
        assert metric(after, "modeld_queue_len", **a) == 0
        assert metric(after, "modeld_inflight", **a) == 0
        assert metric(after, "modeld_used_est_mb") > 0

        client.post("/infer", json={"prompt": "hi", "model": "tiny-b.gguf", "max_tokens": 1})
        evicted = scrape(client)
        assert metric(evicted, "modeld_evictions_total", **a) == 1
        assert metric(evicted, "modeld_loads_total", model="tiny-b.gguf") == 1
        assert 'modeld_loaded_bytes{model="tiny-a.gguf"}' not in evicted

        client.post("/infer", json={"prompt": "x", "model": "nope.gguf"})
        errors = scrape(client)
        assert metric(errors, "modeld_http_requests_total", path="/infer", method="POST",
                      status="404") == 1  # fmt: skip


def test_metric_labels_are_route_templates_not_raw_paths(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        for index in range(20):
            client.delete(f"/requests/r{index}")
            client.get(f"/no/such/path/{index}")
        samples = scrape(client)
    paths = {m.group(1) for key in samples if (m := re.search(r'path="([^"]*)"', key))}
    assert "/requests/{request_id}" in paths
    assert not any(path.startswith("/requests/r") or path.startswith("/no/") for path in paths)


@pytest.mark.slow
def test_gauges_and_rejections_while_gemma_is_busy(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = start_server(
        gemma_dir, *GEMMA_FLAGS,
        "--max-inflight", "2", "--prewarm-default",
    )  # fmt: skip
    g = {"model": GEMMA}
    with server.client() as client:
        running = server.open_infer(LONG_STORY)
        queued = server.open_infer(LONG_STORY)
        with running, queued:
            assert running.recv(64).startswith(b"HTTP/1.1 200")
            poll(lambda: scrape(client), lambda s: metric(s, "modeld_queue_len", **g) == 1)
            refused = client.post("/infer", json=LONG_STORY)
            assert refused.status_code == 429
            samples = scrape(client)
            assert metric(samples, "modeld_inflight", **g) == 1
            assert metric(samples, "modeld_admitted_requests") == 2
            assert metric(samples, "modeld_rejections_total", reason="too_many_inflight",
                          status="429") == 1  # fmt: skip
            assert metric(samples, "modeld_http_inflight_requests", path="/infer") == 2
        idle = poll(lambda: scrape(client), lambda s: metric(s, "modeld_admitted_requests") == 0)
        assert metric(idle, "modeld_inflight", **g) == 0
        assert metric(idle, "modeld_generations_total", done_reason="cancelled", **g) >= 1


# --- logs ---------------------------------------------------------------------------


def log_records(server: RunningServer) -> list[dict[str, object]]:
    records = []
    for line in server.log().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def test_access_log_and_prompt_privacy(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with server.client() as client:
        quiet = client.post(
            "/infer", json={"prompt": "SECRET-AT-INFO", "max_tokens": 2},
            headers={"X-Request-ID": "quiet-1"},
        )  # fmt: skip
        loud = client.post(
            "/infer", json={"prompt": "SHOWN-AT-DEBUG", "max_tokens": 2, "stream": False},
            headers={"X-Request-ID": "loud-1", "X-Log-Level": "debug"},
        )  # fmt: skip
        query = client.post(
            "/infer?log=debug", json={"prompt": "SHOWN-BY-QUERY", "max_tokens": 2},
            headers={"X-Request-ID": "loud-2"},
        )  # fmt: skip
        assert {quiet.status_code, loud.status_code, query.status_code} == {200}
        poll(lambda: server.log(), lambda text: '"loud-2"' in text and '"status":200' in text)
    assert server.stop() == 0
    log = server.log()
    assert "SECRET-AT-INFO" not in log
    assert "SHOWN-AT-DEBUG" in log
    assert "SHOWN-BY-QUERY" in log
    records = log_records(server)
    access = [r for r in records if r.get("message") == "request" and r.get("path") == "/infer"]
    by_id = {r["request_id"]: r for r in access}
    assert set(by_id) >= {"quiet-1", "loud-1", "loud-2"}
    for record in by_id.values():
        assert record["method"] == "POST"
        assert record["status"] == 200
        assert float(record["latency_ms"]) >= 0  # type: ignore[arg-type]
        assert record["model"] == "tiny-a.gguf"
        assert record["level"] == "info"
    prompts = [r for r in records if r.get("message") == "prompt"]
    assert {r["request_id"] for r in prompts} == {"loud-1", "loud-2"}


def test_log_level_header_cannot_hide_errors_or_be_abused(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with server.client() as client:
        for level in ["error", "nonsense", "x" * 1000, ""]:
            response = client.post(
                "/infer", json={"prompt": "HIDDEN", "max_tokens": 1},
                headers={"X-Log-Level": level, "X-Request-ID": "lvl"},
            )  # fmt: skip
            assert response.status_code == 200
    assert server.stop() == 0
    assert "HIDDEN" not in server.log()
    access = [r for r in log_records(server) if r.get("request_id") == "lvl"]
    assert sum(1 for r in access if r.get("message") == "request") == 4


@pytest.mark.slow
def test_log_lines_written_during_a_load_are_not_lost(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    """llama-cpp-python points fd 2 at /dev/null while it loads a model; modeld's log sink
    writes to its own copy of stderr, so requests served meanwhile are still logged."""
    server = start_server(gemma_dir, *GEMMA_FLAGS)
    loader = threading.Thread(
        target=lambda: httpx.post(f"{server.base_url}/models/{GEMMA}/load", timeout=120)
    )
    sent = 0
    with server.client() as client:
        loader.start()
        while loader.is_alive() or sent == 0:
            assert client.get("/models").status_code == 200
            sent += 1
        loader.join()
        client.get("/healthz")
    # The last lines may still be on their way to the file.
    logged = poll(
        lambda: sum(1 for line in server.log().splitlines() if '"route":"/models"' in line),
        lambda count: count >= sent,
        timeout_s=2.5,
        every_s=0.05,
    )
    assert logged == sent


# --- events -------------------------------------------------------------------------


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, object]]]:
    kind = ""
    for line in lines:
        if line.startswith("event: "):
            kind = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield kind, json.loads(line.removeprefix("data: "))


def test_events_stream_shows_load_and_unload(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    with server.client() as client, server.client() as admin:
        with client.stream("GET", "/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            assert next(lines) == ": connected"
            assert admin.post("/models/tiny-a.gguf/load").status_code == 200
            assert admin.delete("/models/tiny-a.gguf/instance").status_code == 200
            seen: list[tuple[str, dict[str, object]]] = []
            for kind, data in sse_events(lines):
                seen.append((kind, data))
                if kind == "model_evicted":
                    break
        kinds = [kind for kind, _ in seen]
        assert kinds[0] == "model_load_started"
        assert "model_ready" in kinds
        assert kinds[-1] == "model_evicted"
        assert all(data["model"] == "tiny-a.gguf" for _, data in seen)
        assert seen[-1][1]["reason"] == "evicted"
        assert client.get("/healthz").status_code == 200
    assert server.stop() == 0  # an open or closed /events stream does not block shutdown
