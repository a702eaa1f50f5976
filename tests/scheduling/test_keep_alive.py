"""Idle unload: an instance nobody uses is unloaded when its keep-alive runs out.

Time is a :class:`ManualClock` the tests advance; the scheduler's reactions are awaited
with ``wait_all_tasks_blocked`` (the check and the move to ``unloading`` happen in one
step on the event loop), never with sleeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from modeld.engine.base import TokenLoop
from modeld.events import ModelEvicted
from modeld.scheduling.manager import ModelManager
from modeld.settings.per_model import ModelSettings
from modeld.types import DoneReason, InferRequest
from tests.scheduling.conftest import ConstantProbe, make_settings
from tests.support.clock import ManualClock

pytestmark = pytest.mark.anyio

MODEL = "tiny-a.gguf"


def ask(**fields: Any) -> InferRequest:
    fields.setdefault("max_tokens", 4)
    fields.setdefault("temperature", 0.0)
    return InferRequest(prompt="hello", model=MODEL, **fields)


def build(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock, **overrides: Any
) -> ModelManager:
    settings = make_settings(models_dir, **overrides)
    return ModelManager(settings, token_loop=token_loop, probe=ConstantProbe(), clock=clock)


async def settle() -> None:
    """Until every task waits on something outside the loop (the keep-alive watch has
    looked, and any unload it began has moved the instance to ``unloading``)."""
    await anyio.wait_all_tasks_blocked()


def state(manager: ModelManager) -> str:
    return manager.state_of(MODEL)


async def gone(manager: ModelManager) -> None:
    """Until the unload the watch began has finished (its engine closes on a thread)."""
    instance = manager._pool.get(MODEL)
    if instance is not None:
        with anyio.fail_after(30):
            await instance.gone.wait()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


async def test_an_idle_instance_unloads_when_its_keep_alive_runs_out(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock
) -> None:
    evicted: list[ModelEvicted] = []
    async with build(models_dir, token_loop, clock, keep_alive="5m") as manager:
        manager.events.add_listener(
            lambda e: evicted.append(e) if isinstance(e, ModelEvicted) else None
        )
        await manager.complete(ask())
        (stats,) = manager.statistics().instances
        assert stats.keep_alive_seconds == 300
        assert stats.expires_at_unix is not None
        assert stats.expires_at_unix - stats.last_used_unix == pytest.approx(300, abs=1)
        clock.advance(299)
        await settle()
        assert state(manager) == "ready"
        clock.advance(2)
        await settle()
        await gone(manager)
        assert state(manager) == "unloaded"
    assert [(e.model, e.reason) for e in evicted] == [(MODEL, DoneReason.IDLE)]


async def test_a_running_or_queued_request_keeps_it_alive(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock
) -> None:
    async with build(models_dir, token_loop, clock, keep_alive="10s") as manager:
        async with manager.stream(ask(max_tokens=8)) as first:
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(manager.complete, ask())  # queued behind the first
                await settle()
                assert manager.statistics().instances[0].queue_len == 1
                assert manager.statistics().instances[0].expires_at_unix is None
                clock.advance(3600)
                await settle()
                assert state(manager) == "ready"
                async for _ in first:
                    pass
            # the queued one ran when the first was done; the clock starts now
            assert state(manager) == "ready"
            clock.advance(9)
            await settle()
            assert state(manager) == "ready"
        assert first.result is not None
        assert first.result.done_reason is DoneReason.LENGTH
        clock.advance(2)
        await settle()
        await gone(manager)
        assert state(manager) == "unloaded"


async def test_pinned_and_never_are_kept_and_zero_unloads_after_each_request(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock
) -> None:
    async with build(models_dir, token_loop, clock, keep_alive="0") as manager:
        await manager.complete(ask())
        await settle()
        await gone(manager)
        assert state(manager) == "unloaded"  # 0: unloaded once the request was done
        await manager.complete(ask(keep_alive=-1))
        clock.advance(10**9)
        await settle()
        assert state(manager) == "ready"  # this request asked for never
        assert manager.statistics().instances[0].keep_alive_seconds is None
        await manager.load(MODEL, pin=True, keep_alive="1s")
        clock.advance(60)
        await settle()
        assert state(manager) == "ready"  # pinned
        await manager.load(MODEL, pin=False)  # back to the default (0), and a use
        await settle()
        await gone(manager)
        assert state(manager) == "unloaded"


async def test_a_request_sets_the_keep_alive_that_follows_it(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock
) -> None:
    async with build(models_dir, token_loop, clock, keep_alive="-1") as manager:
        await manager.complete(ask(keep_alive="1m30s"))
        assert manager.statistics().instances[0].keep_alive_seconds == 90
        clock.advance(89)
        await settle()
        assert state(manager) == "ready"
        await manager.load(MODEL)  # a use with the default (never): the clock stops
        assert manager.statistics().instances[0].expires_at_unix is None
        clock.advance(10**6)
        await settle()
        assert state(manager) == "ready"


async def test_expire_waits_for_running_work_and_cancels_nothing(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock
) -> None:
    async with build(models_dir, token_loop, clock, keep_alive="-1") as manager:
        await manager.expire(MODEL)  # not loaded: nothing to do
        async with manager.stream(ask(max_tokens=8)) as generation:
            await manager.expire(MODEL)
            await settle()
            assert state(manager) == "ready"
            text = "".join([chunk.text async for chunk in generation])
        assert generation.result is not None
        assert generation.result.done_reason is DoneReason.LENGTH
        assert text
        await settle()
        await gone(manager)
        assert state(manager) == "unloaded"
        await manager.load(MODEL)
        await manager.expire(MODEL)  # idle: unloaded before it returns
        assert state(manager) == "unloaded"
        counters = manager.statistics().counters[0]
        assert counters.evictions_total == 0  # idle unloads are not budget evictions


async def test_a_model_s_own_keep_alive_and_embeddings_set_it_too(
    models_dir: Path, token_loop: TokenLoop, clock: ManualClock
) -> None:
    """request > the model's [models] keep_alive > --keep-alive; an embedding is a use."""
    settings = msgspec.structs.replace(
        make_settings(models_dir, keep_alive="1h"), models={MODEL: ModelSettings(keep_alive="1m")}
    )
    manager = ModelManager(settings, token_loop=token_loop, probe=ConstantProbe(), clock=clock)
    async with manager:
        await manager.complete(ask())
        assert manager.statistics().instances[0].keep_alive_seconds == 60
        await manager.embed(MODEL, ["hello"], keep_alive="2m")
        assert manager.statistics().instances[0].keep_alive_seconds == 120
        await manager.embed(MODEL, ["hello"])
        assert manager.statistics().instances[0].keep_alive_seconds == 60
        clock.advance(59)
        await settle()
        assert state(manager) == "ready"
        clock.advance(2)
        await settle()
        await gone(manager)
        assert state(manager) == "unloaded"
        await manager.complete(InferRequest(prompt="hi", model="tiny-b.gguf", max_tokens=2))
        (other,) = manager.statistics().instances
        assert other.keep_alive_seconds == 3600  # no table: the flag
