"""The bridge a replica answers through, on a real modeld app and real models (no Ray):
a request in, a response start and body pieces out, the caller leaving = a disconnect."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from modeld import ModelManager, Settings
from modeld.api.app import create_app
from modeld.events import Event, GenerationFinished
from modeld.ray.bridge import ForwardedRequest, Lifespan, ResponseStart, exchange

from .conftest import FOUR_MODELS, LONG_CONTEXT

pytestmark = pytest.mark.anyio
TAG = ((b"x-modeld-replica", b"r-test"),)
HOST = ((b"host", b"127.0.0.1"), (b"content-type", b"application/json"))


def _infer(body: dict[str, object]) -> ForwardedRequest:
    return ForwardedRequest("POST", "/infer", headers=HOST, body=orjson.dumps(body))


async def _collect(parts: AsyncIterator[ResponseStart | bytes]) -> tuple[ResponseStart, bytes]:
    items = [part async for part in parts]
    start = items[0]
    assert isinstance(start, ResponseStart)
    assert all(isinstance(item, bytes) for item in items[1:])
    return start, b"".join(item for item in items[1:] if isinstance(item, bytes))


@pytest.fixture
def long_models(tmp_path: Path, long_model_dir: Path) -> Path:
    directory = tmp_path / "models"
    directory.mkdir()
    shutil.copyfile(long_model_dir / FOUR_MODELS[0], directory / FOUR_MODELS[0])
    return directory


def _settings(models_dir: Path, **overrides: Any) -> Settings:
    return Settings(
        models_dir=models_dir,
        n_ctx=LONG_CONTEXT,
        threads=1,
        vram_budget_mb=512,
        vram_margin_mb=0,
        **overrides,
    )


async def test_a_stream_comes_out_as_a_start_and_pieces(long_models: Path) -> None:
    settings = _settings(long_models)
    app = create_app(settings)
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        request = _infer({"model": FOUR_MODELS[0], "prompt": "hello", "max_tokens": 20})
        start, body = await _collect(exchange(app, request, TAG))
    finally:
        await lifespan.shutdown()
    assert start.status == 200
    assert start.header(b"content-type") == b"application/x-ndjson"
    assert start.header(b"x-modeld-replica") == b"r-test"
    lines = [orjson.loads(line) for line in body.splitlines()]
    assert [line.get("done") for line in lines].count(True) == 1
    assert lines[-1]["done_reason"] == "length"
    assert sum(line.get("tokens", 0) for line in lines[:-1]) == 20


async def test_the_caller_leaving_cancels_the_generation(long_models: Path) -> None:
    settings = _settings(long_models)
    manager = ModelManager(settings)
    finished: list[GenerationFinished] = []
    done = anyio.Event()

    def on_event(event: Event) -> None:
        if isinstance(event, GenerationFinished):
            finished.append(event)
            done.set()

    manager.events.add_listener(on_event)
    app = create_app(settings, manager)
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        max_tokens = LONG_CONTEXT - 64
        request = _infer({"model": FOUR_MODELS[0], "prompt": "hello", "max_tokens": max_tokens})
        parts = exchange(app, request, TAG)
        assert isinstance(await anext(parts), ResponseStart)
        assert isinstance(await anext(parts), bytes)
        await parts.aclose()  # what Ray does to the replica's generator when a client leaves
        with anyio.fail_after(10):
            await done.wait()
        assert manager.statistics().admitted == 0
    finally:
        await lifespan.shutdown()
    assert finished[0].result.done_reason == "cancelled"
    assert finished[0].result.metrics.completion_tokens < max_tokens


async def test_errors_pass_through_as_the_app_answers_them(long_models: Path) -> None:
    app = create_app(_settings(long_models))
    lifespan = Lifespan(app)
    await lifespan.startup()
    try:
        unknown_field = _infer({"model": FOUR_MODELS[0], "prompt": "hi", "colour": "red"})
        start, body = await _collect(exchange(app, unknown_field, TAG))
        assert start.status == 400
        assert orjson.loads(body)["error"]["field"] == "colour"
        unknown_model = _infer({"model": "nope.gguf", "prompt": "hi"})
        start, body = await _collect(exchange(app, unknown_model, TAG))
        assert start.status == 404
        assert orjson.loads(body)["error"]["code"] == "model_not_found"
    finally:
        await lifespan.shutdown()


async def test_a_failed_startup_says_why(long_models: Path) -> None:
    settings = _settings(long_models, default_model="missing.gguf", prewarm_default=True)
    lifespan = Lifespan(create_app(settings))
    with pytest.raises(RuntimeError, match=r"missing\.gguf"):
        await lifespan.startup()
    assert not lifespan.running


async def test_shutdown_closes_every_instance(long_models: Path) -> None:
    settings = _settings(long_models)
    manager = ModelManager(settings)
    lifespan = Lifespan(create_app(settings, manager))
    await lifespan.startup()
    await manager.load(FOUR_MODELS[0])
    assert manager.is_ready(FOUR_MODELS[0])
    await lifespan.shutdown()
    assert not lifespan.running
    assert not manager.accepting
    assert manager.statistics().instances == ()


async def test_an_app_that_fails_before_answering_gives_a_500() -> None:
    """A fake app: modeld's own always answers, so the failure has to be injected."""

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("boom")

    start, body = await _collect(exchange(broken, ForwardedRequest("GET", "/x"), TAG))
    assert start.status == 500
    assert start.header(b"x-modeld-replica") == b"r-test"
    assert orjson.loads(body)["error"]["code"] == "internal_error"
