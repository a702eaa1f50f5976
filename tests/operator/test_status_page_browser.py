"""The status page in a real browser (Debian's Chromium driven by Playwright) against a
real server: the meter and the rows agree with ``/status``, loads, evictions and errors
show up live without a reload, and the page reconnects when the server restarts on the
same port.

Without ``/usr/bin/chromium`` (``apt-get install -y chromium``) these tests skip, naming
the fix; with ``MODELD_REQUIRE_BROWSER=1`` they fail instead. CI installs Chromium and sets
it (``.ci/run``), so there they can never silently skip. ``MODELD_UPDATE_SCREENSHOTS=1`` writes the
screenshot that docs/operations.md shows to docs/status-page.png.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.http import GEMMA, ServerFactory
from tests.support.server import RunningServer, start_modeld

CHROMIUM = Path(os.environ.get("MODELD_CHROMIUM", "/usr/bin/chromium"))
DOCS_SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "status-page.png"
WAIT_MS = 15_000


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        reason = f"the status page tests need Debian's Chromium at {CHROMIUM}"
        reason += ": apt-get install -y chromium"
        if os.environ.get("MODELD_REQUIRE_BROWSER") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1200, "height": 820})
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    yield opened
    context.close()
    # A server that went away makes fetch() log "Failed to load resource": expected.
    assert [e for e in errors if "Failed to load resource" not in e] == []


def expect(locator: Any) -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def row(page: Any, model: str) -> Any:
    return page.locator(f'#models tbody tr[data-model-id="{model}"]')


def check_against_status(page: Any, client: httpx.Client) -> dict[str, Any]:
    """The meter and every row say what ``/status`` says."""
    status = client.get("/status").json()
    meter = page.get_by_role("meter")
    expect(meter).to_have_attribute("aria-valuemax", str(status["budget_mb"]), timeout=WAIT_MS)
    used = float(meter.get_attribute("aria-valuenow"))
    assert used == pytest.approx(status["used_est_mb"], abs=0.001)
    segments = page.locator("#budget .segment")
    assert sorted(segments.evaluate_all("s => s.map(e => e.dataset.modelId)")) == sorted(
        i["model_id"] for i in status["instances"] if i["est_vram_mb"] > 0
    )
    for instance in status["instances"]:
        shown = row(page, instance["model_id"])
        expect(shown).to_have_attribute("data-state", instance["state"], timeout=WAIT_MS)
        expect(shown).to_have_attribute("data-pinned", str(instance["pinned"]).lower())
        expect(shown.locator('[data-field="queue"]')).to_have_text(str(instance["queue_len"]))
        expect(shown.locator('[data-field="inflight"]')).to_have_text(str(instance["inflight"]))
    return dict(status)


def test_the_page_follows_loads_evictions_errors_and_restarts(
    page: Any, start_server: ServerFactory, models_dir: Path, tmp_path: Path
) -> None:
    (models_dir / "broken.gguf").write_bytes(b"GGUF" + b"\xff" * 64)  # fails validation
    flags = ("--vram-budget-mb", "24", "--vram-margin-mb", "4")  # two tiny models fit
    server = start_server(models_dir, *flags)
    page.goto(server.base_url + "/")
    with server.client() as client:
        expect(page.locator("#connection")).to_have_attribute("data-connected", "true")
        expect(page.locator("#no-models")).to_be_visible()
        check_against_status(page, client)

        # A pinned load, then a generation: rows appear and fill in without a reload.
        assert client.post("/models/tiny-a.gguf/load", json={"pin": True}).is_success
        expect(row(page, "tiny-a.gguf")).to_have_attribute("data-state", "ready")
        expect(row(page, "tiny-a.gguf")).to_have_attribute("data-pinned", "true")
        body = {"model": "tiny-b.gguf", "prompt": "hello", "max_tokens": 16, "stream": False}
        speed = client.post("/infer", json=body).json()["metrics"]["tokens_per_second"]
        b_speed = row(page, "tiny-b.gguf").locator('[data-field="tokens-per-second"]')
        expect(b_speed).to_have_text(f"{speed:.1f}", timeout=WAIT_MS)
        check_against_status(page, client)

        # tiny-c needs the room: tiny-b (idle, unpinned) is evicted, and the page says why.
        assert client.post("/models/tiny-c.gguf/load").is_success
        expect(row(page, "tiny-b.gguf")).to_have_attribute("data-state", "unloaded")
        expect(row(page, "tiny-c.gguf")).to_have_attribute("data-state", "ready")
        eviction = page.locator(
            '#events li[data-kind="model_evicted"][data-model-id="tiny-b.gguf"]'
        )
        expect(eviction).to_contain_text("to make room for tiny-c.gguf")
        status = check_against_status(page, client)
        assert {i["model_id"] for i in status["instances"]} == {"tiny-a.gguf", "tiny-c.gguf"}

        # A file that fails validation: an error row, cooling down, with its last error.
        assert client.post("/models/broken.gguf/load").status_code == 422
        broken = row(page, "broken.gguf")
        expect(broken).to_have_attribute("data-state", "error", timeout=WAIT_MS)
        expect(broken).to_have_attribute("data-cooling-down", "")
        expect(broken).to_contain_text("cooling down")
        expect(broken).to_contain_text("retry in")
        expect(page.locator('#events li[data-kind="model_error"]')).to_contain_text("broken.gguf")

        shot = tmp_path / "status-page.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 10_000 < shot.stat().st_size < 400_000
        if os.environ.get("MODELD_UPDATE_SCREENSHOTS") == "1":
            shutil.copyfile(shot, DOCS_SCREENSHOT)

    # The server stops: the page says so, then reconnects to a new one on the same port.
    _, port = server.address
    assert server.stop() == 0
    expect(page.locator("#connection")).to_have_attribute("data-connected", "false")
    restarted = start_modeld(models_dir, tmp_path, "--threads", "1", "--n-ctx", "256", port=port)
    try:
        expect(page.locator("#connection")).to_have_attribute(
            "data-connected", "true", timeout=WAIT_MS
        )
        expect(page.locator("#no-models")).to_be_visible()  # the new server's picture
        with restarted.client() as client:
            assert client.post("/models/tiny-b.gguf/load").is_success
            expect(row(page, "tiny-b.gguf")).to_have_attribute("data-state", "ready")
            started = page.locator(
                '#events li[data-kind="model_ready"][data-model-id="tiny-b.gguf"]'
            )
            expect(started).to_have_count(2)  # the first server's and the new one's
            check_against_status(page, client)
    finally:
        assert restarted.stop() == 0


@pytest.mark.slow
def test_a_load_shows_its_stages_live(
    page: Any, start_server: ServerFactory, gemma_dir: Path
) -> None:
    server: RunningServer = start_server(gemma_dir, "--threads", "2", "--n-ctx", "1024")
    page.goto(server.base_url + "/")
    expect(page.locator("#connection")).to_have_attribute("data-connected", "true")
    with server.client() as client:
        loading = threading.Thread(target=client.post, args=(f"/models/{GEMMA}/load",))
        loading.start()
        try:
            gemma = row(page, GEMMA)
            expect(gemma).to_have_attribute("data-state", "loading", timeout=WAIT_MS)
            expect(gemma.locator("progress")).to_have_count(1)
            expect(gemma).to_contain_text("memory reserved", timeout=WAIT_MS)
            expect(gemma).to_have_attribute("data-state", "ready", timeout=60_000)
        finally:
            loading.join(60)
        check_against_status(page, client)


class RequireKey:
    """Stands in for the ``--api-key`` middleware being built elsewhere (issue 11): data
    routes answer 401 without ``Authorization: Bearer <key>``. The page itself (``/``)
    stays open: a browser's navigation cannot carry the header, and the page holds no
    data."""

    def __init__(self, app: Any, key: str) -> None:
        self.app = app
        self.key = key
        self.refused: list[str] = []  # the paths answered 401

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in {"/", "/healthz"}:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if given != f"Bearer {self.key}".encode():
                self.refused.append(scope["path"])
                body = b'{"error": {"code": "unauthorized", "message": "API key needed"}}'
                headers = [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def test_behind_an_api_key_the_page_asks_once_and_sends_it_as_a_header(
    page: Any, models_dir: Path
) -> None:
    from modeld.api.app import create_app
    from modeld.settings.config import load_settings
    from tests.support.operator import serving

    flags = {"models_dir": str(models_dir), "threads": "1", "n_ctx": "256"}
    guarded = RequireKey(create_app(load_settings(flags, env={})), "k-123")
    with serving(guarded) as url:
        page.goto(url + "/")
        form = page.locator("#key-form")
        expect(form).to_be_visible(timeout=WAIT_MS)
        expect(page.locator("#connection")).to_have_text("API key needed")
        page.fill("#api-key", "wrong")
        page.click("#key-form button")
        expect(form).to_be_visible(timeout=WAIT_MS)  # refused again: asked again
        page.fill("#api-key", "k-123")
        page.click("#key-form button")
        expect(page.locator("#connection")).to_have_attribute(
            "data-connected", "true", timeout=WAIT_MS
        )
        expect(form).to_be_hidden()
        headers = {"Authorization": "Bearer k-123"}
        assert httpx.post(url + "/models/tiny-a.gguf/load", headers=headers).is_success
        expect(row(page, "tiny-a.gguf")).to_have_attribute("data-state", "ready")
        assert page.evaluate("sessionStorage.getItem('modeld.apiKey')") == "k-123"
        refused = len(guarded.refused)
        page.reload()  # the tab keeps the key: no second prompt
        expect(page.locator("#connection")).to_have_attribute(
            "data-connected", "true", timeout=WAIT_MS
        )
        expect(form).to_be_hidden()
        assert guarded.refused[refused:] == []
    assert set(guarded.refused) <= {"/status", "/events"}  # the page asked for nothing else
