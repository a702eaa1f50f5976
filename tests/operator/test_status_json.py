"""What the status page reads: ``GET /`` for browsers only, and the fields ``/status``
gained for it (last tokens/s, load stage, recent events with why a model was evicted)."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import anyio
import pytest

from modeld.api.status_page import wants_html
from modeld.scheduling.manager import ModelManager
from modeld.types import InstanceState
from tests.scheduling.conftest import ConstantProbe, make_settings
from tests.scheduling.test_faults import ask, hanging_load
from tests.support.http import ServerFactory, ndjson

BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (BROWSER_ACCEPT, True),
        ("text/html", True),
        ("*/*", False),  # curl, httpx
        ("", False),
        ("application/json", False),
        ("application/json, text/html;q=0.9", False),
        ("text/html;q=0.5, application/json;q=0.5", True),
        ("text/html;q=0", False),
        ("text/html;q=bogus", False),
    ],
)
def test_only_a_client_that_prefers_html_gets_the_page(accept: str, html: bool) -> None:
    assert wants_html(accept) is html


def test_the_page_is_self_contained_and_json_clients_keep_their_404(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        page = client.get("/", headers={"Accept": BROWSER_ACCEPT})
        assert page.status_code == 200
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        policy = page.headers["content-security-policy"]
        assert "default-src 'none'" in policy
        assert "connect-src 'self'" in policy
        assert re.search(r"script-src 'sha256-[A-Za-z0-9+/=]+'", policy)
        assert page.headers["x-request-id"]
        assert len(page.content) < 40_000  # small enough to read
        # Nothing from elsewhere: no external scripts, styles, fonts or images.
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page.text)
        assert "@import" not in page.text
        assert 'role="meter"' in page.text
        for accept in ("*/*", "application/json"):
            answer = client.get("/", headers={"Accept": accept})
            assert answer.status_code == 404
            assert answer.json()["error"]["code"] == "not_found"
        assert client.post("/", headers={"Accept": BROWSER_ACCEPT}).status_code == 405


def test_status_reports_tokens_per_second_and_why_models_were_evicted(
    start_server: ServerFactory, models_dir: Path
) -> None:
    # A budget for one tiny model at a time: loading tiny-b evicts tiny-a.
    server = start_server(models_dir, "--vram-budget-mb", "12", "--vram-margin-mb", "0")
    with server.client() as client:
        lines = ndjson(client.post("/infer", json={"model": "tiny-a.gguf", "prompt": "hi"}).text)
        speed = lines[-1]["metrics"]["tokens_per_second"]  # type: ignore[index]
        status = client.get("/status").json()
        (a,) = status["instances"]
        assert a["last_tokens_per_second"] == speed > 0
        assert (a["load_stage"], a["load_progress"]) == (None, 0.0)  # not loading
        assert client.post("/models/tiny-b.gguf/load").status_code == 200
        assert client.delete("/models/tiny-b.gguf/instance").status_code == 200
        events = client.get("/status").json()["recent_events"]
    kinds = [(e["kind"], e["model"]) for e in events]
    assert kinds == [
        ("model_load_started", "tiny-a.gguf"),
        ("model_ready", "tiny-a.gguf"),
        ("model_load_started", "tiny-b.gguf"),
        ("model_evicted", "tiny-a.gguf"),
        ("model_ready", "tiny-b.gguf"),
        ("model_evicted", "tiny-b.gguf"),
    ]
    evicted_a, evicted_b = (e["details"] for e in events if e["kind"] == "model_evicted")
    assert evicted_a == {"reason": "evicted", "cause": "budget", "for_model": "tiny-b.gguf"}
    assert evicted_b == {"reason": "evicted", "cause": "unload", "for_model": None}
    assert all(isinstance(e["details"].get("load_ms", 0), int) for e in events)
    times = [e["time_unix"] for e in events]
    assert times == sorted(times)


def test_recent_events_keep_the_newest_fifty(start_server: ServerFactory, models_dir: Path) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        for _ in range(20):  # three events each: started, ready, evicted
            assert client.post("/models/tiny-c.gguf/load").status_code == 200
            assert client.delete("/models/tiny-c.gguf/instance").status_code == 200
        events = client.get("/status").json()["recent_events"]
    made = ["model_load_started", "model_ready", "model_evicted"] * 20
    assert [e["kind"] for e in events] == made[-50:]  # the 10 oldest are gone


@pytest.mark.anyio
async def test_a_loading_instance_shows_its_stage(models_dir: Path, token_loop) -> None:  # type: ignore[no-untyped-def]
    release = threading.Event()
    manager = ModelManager(
        make_settings(models_dir),
        token_loop=token_loop,
        probe=ConstantProbe(),
        engine_factory=hanging_load(release),
    )
    try:
        async with manager, manager.events.subscribe() as events:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(manager.complete, ask())
                # the factory hangs after the memory is reserved, as if the weights loaded
                with anyio.fail_after(10):
                    while getattr(await events.next(), "stage", None) != "memory_reserved":
                        pass
                (loading,) = manager.statistics().instances
                assert loading.state is InstanceState.LOADING
                assert loading.load_progress == 0.2
                release.set()
            (ready,) = manager.statistics().instances
            assert ready.state is InstanceState.READY
            assert (ready.load_stage, ready.load_progress) == (None, 0.0)
            assert ready.last_tokens_per_second > 0
    finally:
        release.set()
