"""SIGTERM through the real server (the real Gemma, where a stream must still be running):
streams end with their terminal line, new work is refused during the grace, and the
process exits 0."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import httpx
import pytest

from tests.support.http import GEMMA, GEMMA_FLAGS, LONG_STORY, ServerFactory, poll
from tests.support.server import RunningServer


def gemma_server(start_server: ServerFactory, gemma_dir: Path, grace_s: str) -> RunningServer:
    return start_server(
        gemma_dir, *GEMMA_FLAGS,
        "--shutdown-grace", grace_s, "--prewarm-default",
    )  # fmt: skip


def test_sigterm_after_a_request_exits_zero(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir, "--default-model", "tiny-a.gguf")
    with server.client() as client:
        client.post("/infer", json={"prompt": "hi", "max_tokens": 2})
    assert server.stop() == 0


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_sigterm_when_idle_exits_zero_and_closes_the_port(
    start_server: ServerFactory, gemma_dir: Path
) -> None:
    server = gemma_server(start_server, gemma_dir, "5")
    with server.client() as client:
        assert client.get("/readyz").status_code == 200
    assert server.stop() == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(server.base_url + "/healthz", timeout=2)


def test_sigterm_while_a_request_waits_for_its_load_is_a_503_shutting_down(
    start_server: ServerFactory, medium_model_dir: Path, tmp_path: Path
) -> None:
    """The request waits for memory a pinned model holds; SIGTERM ends the load with the
    shutdown, not as a failed load: 503 ``shutting_down`` with ``Retry-After``, and no
    ``model_failed`` against the file."""
    directory = tmp_path / "medium"
    directory.mkdir()
    for name in ["med-a.gguf", "med-b.gguf"]:
        (directory / name).write_bytes((medium_model_dir / name).read_bytes())
    server = start_server(
        directory, "--vram-budget-mb", "30", "--vram-margin-mb", "0", "--max-wait-ms", "60000",
        "--shutdown-grace", "1",
    )  # fmt: skip
    with server.client() as client:
        assert client.post("/models/med-a.gguf/load", json={"pin": True}).status_code == 200
        waiting = server.open_infer({"prompt": "hi", "model": "med-b.gguf", "stream": False})
        with waiting:
            poll(lambda: client.get("/status").json()["admitted"], lambda n: n == 1)
            server.process.send_signal(signal.SIGTERM)
            answer = b""
            while chunk := waiting.recv(65536):
                answer += chunk
                if b"\r\n\r\n" in answer and answer.rstrip().endswith(b"}"):
                    break
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert b"retry-after:" in head.lower()
    assert json.loads(body)["error"]["code"] == "shutting_down"
    assert server.process.wait(timeout=30) == 0
    assert "model_failed" not in server.log()
    assert "model_load_failed" not in server.log()
