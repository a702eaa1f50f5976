"""SIGTERM through the real server and the real Gemma: streams end with their terminal
line, new work is refused during the grace, and the process exits 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from modeld.testing.server import RunningServer
from tests.hardening.conftest import GEMMA, ServerFactory, poll

pytestmark = pytest.mark.slow

LONG_STORY = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7}


def gemma_server(start_server: ServerFactory, gemma_dir: Path, grace_s: str) -> RunningServer:
    return start_server(
        gemma_dir, "--default-model", GEMMA, "--threads", "2", "--n-ctx", "1024",
        "--shutdown-grace", grace_s, "--prewarm-default",
    )  # fmt: skip


def test_sigterm_mid_stream_ends_it_with_shutdown(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = gemma_server(start_server, gemma_dir, "0.5")
    with server.client() as client, client.stream("POST", "/infer", json=LONG_STORY) as response:
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert "text" in first
        server.process.send_signal(signal.SIGTERM)
        rest = [json.loads(line) for line in lines]
    terminal = rest[-1]
    assert terminal["done"] is True
    assert terminal["done_reason"] == "shutdown"
    assert terminal["metrics"]["completion_tokens"] < 900
    assert sum(1 for line in rest if line.get("done")) == 1
    assert server.process.wait(timeout=60) == 0


def test_new_work_is_refused_during_the_grace(start_server: ServerFactory, gemma_dir: Path) -> None:
    """A long grace keeps the window open; the test ends it by leaving the stream."""
    server = gemma_server(start_server, gemma_dir, "60")
    with server.client() as client, client.stream("POST", "/infer", json=LONG_STORY) as response:
        lines = response.iter_lines()
        next(lines)
        server.process.send_signal(signal.SIGTERM)
        ready = poll(lambda: client.get("/readyz"), lambda r: r.status_code == 503)
        assert ready.json() == {"status": "not_ready", "reason": "shutting_down"}
        refused = client.post("/infer", json={"prompt": "hi", "max_tokens": 1})
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "shutting_down"
        load = client.post(f"/models/{GEMMA}/load")
        assert load.status_code == 503
        assert client.get("/healthz").status_code == 200  # alive while draining
        assert json.loads(next(lines))["text"] is not None  # the stream still runs
    # Leaving the stream cancels the generation: the drain ends, the process exits.
    assert server.process.wait(timeout=60) == 0
    log = server.log()
    assert "shutdown requested" in log
    assert "modeld stopped" in log


def test_sigterm_when_idle_exits_zero_and_closes_the_port(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = gemma_server(start_server, gemma_dir, "5")
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    assert server.stop() == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/healthz", timeout=2)
