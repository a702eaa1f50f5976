"""Cancellation at every await of a request's life: admission, the queue, the load, the
hand-over of the slot, the stream and its close. Whatever the point, nothing leaks: no
admission count, no slot, no queue entry, no running generation, no budget charge, and
the model serves the next request.

The cancel point is chosen by counting the request's suspensions (each await that
parks the task) and cancelling its scope at the n-th one; hypothesis picks n.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine, Generator
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio.lowlevel import checkpoint
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from modeld.engine.base import TokenLoop
from modeld.scheduling.manager import ModelManager
from modeld.types import InferRequest
from tests.scheduling.conftest import ConstantProbe, make_settings

MODEL = "tiny-a.gguf"
MAX_SUSPENSIONS = 40  # a run has about 6; n past its end cancels nothing


class CancelAtSuspension:
    """Awaits ``coro``, cancelling ``scope`` when the coroutine parks for the n-th time.

    The cancellation is requested while the task sits in that await, so that await is
    where it lands (asyncio and trio alike). ``suspensions`` counts them all, so a test
    can tell a run that was cut from one that finished first.
    """

    def __init__(self, coro: Coroutine[Any, Any, None], n: int, scope: anyio.CancelScope) -> None:
        self._coro = coro
        self._n = n
        self._scope = scope
        self.suspensions = 0

    def __await__(self) -> Generator[Any, Any, None]:
        inner = self._coro.__await__()
        value: Any = None
        error: BaseException | None = None
        while True:
            try:
                yielded = inner.throw(error) if error is not None else inner.send(value)
            except StopIteration:
                return
            self.suspensions += 1
            if self.suspensions == self._n:
                self._scope.cancel()
            try:
                value, error = (yield yielded), None
            except BaseException as exc:  # handed back into the coroutine
                value, error = None, exc


def ask(max_tokens: int = 8) -> InferRequest:
    return InferRequest(prompt="hello there", model=MODEL, max_tokens=max_tokens, temperature=0.0)


async def consume(manager: ModelManager, request: InferRequest) -> None:
    async with manager.stream(request) as generation:
        async for _ in generation:
            pass


async def worker_idle(manager: ModelManager) -> None:
    """Wait until the model's worker has run everything queued before now: a request
    cancelled while its prompt was being tokenized keeps the model busy until then."""
    instance = manager._pool.get(MODEL)
    if instance is not None and instance.worker is not None:
        await instance.worker.run(lambda: None)


def assert_nothing_leaked(manager: ModelManager) -> None:
    stats = manager.statistics()
    assert stats.admitted == 0
    for instance in stats.instances:
        assert (instance.model_id, instance.inflight, instance.queue_len) == (
            instance.model_id,
            0,
            0,
        )
    slot = manager._pool.slot_for(MODEL)
    assert not slot.busy
    assert slot.queue_len == 0
    assert manager._generations == {}
    charged_mb = sum(i.est_vram_mb for i in stats.instances)
    assert stats.used_est_mb == pytest.approx(charged_mb, abs=0.01)


async def still_serves(manager: ModelManager) -> None:
    with anyio.fail_after(60):
        _, result = await manager.complete(ask(max_tokens=2))
    assert result.metrics.completion_tokens == 2


Scenario = Callable[[ModelManager, int, int], Awaitable[int]]


async def cold(manager: ModelManager, n: int, delay: int = 0) -> int:
    """The model is not loaded: admission, the load wait, the start, the stream."""
    with anyio.CancelScope() as scope:
        runner = CancelAtSuspension(consume(manager, ask()), n, scope)
        await runner
    return runner.suspensions


async def warm(manager: ModelManager, n: int, delay: int = 0) -> int:
    """The model is loaded and idle: the slot's fast path."""
    await manager.load(MODEL)
    return await cold(manager, n)


async def queued(manager: ModelManager, n: int, delay: int = 0) -> int:
    """Another request holds the slot and hands it over while this one waits, ``delay``
    scheduler steps after this one has queued (or been cancelled)."""
    await manager.load(MODEL)
    runner: CancelAtSuspension | None = None
    async with manager.stream(ask()) as holder, anyio.create_task_group() as tasks:

        async def release_holder() -> None:
            slot = manager._pool.slot_for(MODEL)
            while slot.queue_len == 0 and (runner is None or runner.suspensions < n):
                await checkpoint()
            for _ in range(delay):
                await checkpoint()
            async for _ in holder:
                pass
            await holder.aclose()  # hand the slot to the waiter now, not at block exit

        tasks.start_soon(release_holder)
        with anyio.CancelScope() as scope:
            runner = CancelAtSuspension(consume(manager, ask()), n, scope)
            await runner
    return runner.suspensions


def run_scenario(
    scenario: Scenario,
    n: int,
    models_dir: Path,
    token_loop: TokenLoop,
    backend: str,
    delay: int = 0,
) -> int:
    async def main() -> int:
        manager = ModelManager(
            make_settings(models_dir), token_loop=token_loop, probe=ConstantProbe()
        )
        async with manager:
            with anyio.fail_after(60):
                suspensions = await scenario(manager, n, delay)
                await worker_idle(manager)
            assert_nothing_leaked(manager)
            await still_serves(manager)
            assert_nothing_leaked(manager)
        return suspensions

    return anyio.run(main, backend=backend)


CANCEL_POINT = st.integers(min_value=1, max_value=MAX_SUSPENSIONS)
HYPOTHESIS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("scenario", [cold, warm, queued], ids=lambda s: s.__name__)
@HYPOTHESIS
@given(n=CANCEL_POINT, delay=st.integers(min_value=0, max_value=20))
@example(n=1, delay=0)
def test_cancel_anywhere_leaks_nothing(
    scenario: Scenario, backend: str, n: int, delay: int, models_dir: Path, token_loop: TokenLoop
) -> None:
    """Hypothesis picks the cancel point and, for a queued request, when the holder hands
    the slot over relative to it."""
    run_scenario(scenario, n, models_dir, token_loop, backend, delay)


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
@pytest.mark.parametrize("scenario", [cold, warm, queued], ids=lambda s: s.__name__)
def test_every_early_cancel_point_leaks_nothing(
    scenario: Scenario, backend: str, models_dir: Path, token_loop: TokenLoop
) -> None:
    """Every suspension of an uncut run, one by one, so none is left to chance."""
    total = run_scenario(scenario, MAX_SUSPENSIONS + 1, models_dir, token_loop, backend)
    assert 2 <= total < MAX_SUSPENSIONS  # await points to cut at, all within hypothesis' range
    for n in range(1, total + 1):
        run_scenario(scenario, n, models_dir, token_loop, backend)
