"""A hypothesis state machine over the real scheduler and real tiny models.

Rules submit, cancel, unload, pin and drain requests against three models in a budget
that holds two, and move time (a :class:`ManualClock` the keep-alive runs on); after
every step the invariants below must hold. The event loop runs in a blocking portal so
that hypothesis can drive it step by step.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from anyio.from_thread import BlockingPortal, start_blocking_portal
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from modeld.errors import ModeldError
from modeld.events import Event, ModelEvicted, ModelReady
from modeld.scheduling.manager import ModelManager
from modeld.settings.keep_alive import keep_alive_seconds
from modeld.sizes import MIB
from modeld.types import DoneReason, InferRequest
from tests.scheduling.conftest import ConstantProbe, estimate_bytes, make_settings
from tests.support.clock import ManualClock

MODELS = ["med-a.gguf", "med-b.gguf", "med-c.gguf"]
KEEP_ALIVE_S = 30  # the default; requests may ask for others


def _budget_for_two(models_dir: Path) -> int:
    """Budget (MB) in which two loaded models plus one reservation fit, three do not."""
    return int((estimate_bytes(models_dir, MODELS[0]) * 2.5) // MIB) + 1


class SchedulerMachine(RuleBasedStateMachine):
    models_dir: Path
    token_loop: Any

    def __init__(self) -> None:
        super().__init__()
        self.portal_cm = start_blocking_portal("asyncio")
        self.portal: BlockingPortal = self.portal_cm.__enter__()
        settings_ = make_settings(
            self.models_dir,
            vram_budget_mb=_budget_for_two(self.models_dir),
            max_queue_depth=3,
            max_wait_ms=2000,
            keep_alive=KEEP_ALIVE_S,
        )
        self.clock = ManualClock()
        self.manager = ModelManager(
            settings_, token_loop=self.token_loop, probe=ConstantProbe(), clock=self.clock
        )
        self.manager.events.add_listener(self._check_idle_unload)
        self.busy_idle_unloads: list[str] = []
        self.early_idle_unloads: list[str] = []
        # per model, on the clock: the last use, and the keep-alive it left behind
        self.last_use_s: dict[str, float] = {}
        self.keep_alive_s: dict[str, float] = {}
        # The manager's task group must live in one task: let the portal host it.
        self.manager_cm = self.portal.wrap_async_context_manager(self.manager)
        self.manager_cm.__enter__()
        self.requests: dict[str, Future[Any]] = {}
        self.endings: dict[str, list[str]] = defaultdict(list)
        self.submitted: dict[str, list[str]] = defaultdict(list)
        self.started: dict[str, list[str]] = defaultdict(list)
        self.max_seen_inflight: dict[str, int] = defaultdict(int)
        self.counter = 0

    def _used(self, model: str, keep_alive: float | None) -> None:
        self.last_use_s[model] = self.clock.now_s()
        self.keep_alive_s[model] = keep_alive_seconds(
            KEEP_ALIVE_S if keep_alive is None else keep_alive
        )

    def _check_idle_unload(self, event: Event) -> None:
        """At the moment of an idle unload the instance must have been idle (nothing
        running, nothing queued, not pinned) for at least the keep-alive its last use
        left behind."""
        if isinstance(event, ModelReady):
            self._used(event.model, None)  # a new instance starts with the default
        if isinstance(event, ModelEvicted) and event.reason is DoneReason.IDLE:
            instance = self.manager._pool.get(event.model)
            busy = instance is None or not instance.slot.idle or instance.active is not None
            if busy or instance.pinned:
                self.busy_idle_unloads.append(event.model)
            idle_s = self.clock.now_s() - self.last_use_s[event.model]
            if idle_s < self.keep_alive_s[event.model]:
                self.early_idle_unloads.append(event.model)

    async def _request(
        self, request_id: str, model: str, max_tokens: int, keep_alive: float | None
    ) -> None:
        try:
            request = InferRequest(
                prompt="hi",
                model=model,
                max_tokens=max_tokens,
                temperature=0,
                keep_alive=keep_alive,
            )
            async with self.manager.stream(request, request_id=request_id) as generation:
                self.started[model].append(request_id)
                self.keep_alive_s[model] = keep_alive_seconds(
                    KEEP_ALIVE_S if keep_alive is None else keep_alive
                )
                busy = sum(1 for g in self.manager._generations.values() if g.model_id == model)
                self.max_seen_inflight[model] = max(self.max_seen_inflight[model], busy)
                async for _ in generation:
                    await anyio.lowlevel.checkpoint()
                # the step that ended the stream released the model: no await since
                self.last_use_s[model] = self.clock.now_s()
            assert generation.result is not None
            self.endings[request_id].append(str(generation.result.done_reason))
        except ModeldError as exc:
            self.endings[request_id].append(exc.code)
        except anyio.get_cancelled_exc_class():
            self.endings[request_id].append("task-cancelled")
            raise

    @rule(
        model=st.sampled_from(MODELS),
        max_tokens=st.integers(1, 40),
        keep_alive=st.sampled_from([None, None, 0, 5, -1]),
    )
    def submit(self, model: str, max_tokens: int, keep_alive: float | None) -> None:
        self.counter += 1
        request_id = f"r{self.counter}"
        self.submitted[model].append(request_id)
        self.requests[request_id] = self.portal.start_task_soon(
            self._request, request_id, model, max_tokens, keep_alive
        )
        self.portal.call(anyio.wait_all_tasks_blocked)

    @rule(seconds=st.sampled_from([1, 4, 6, 29, 31, 3600]))
    def advance_clock(self, seconds: float) -> None:
        self.portal.call(self.clock.advance, seconds)
        self.portal.call(anyio.wait_all_tasks_blocked)

    async def _pin(self, model: str, pinned: bool) -> None:
        if self.manager.is_ready(model):
            with anyio.move_on_after(5), contextlib.suppress(ModeldError):
                await self.manager.load(model, pin=pinned)  # a loaded one: at once
                self._used(model, None)

    @rule(model=st.sampled_from(MODELS), pinned=st.booleans())
    def pin(self, model: str, pinned: bool) -> None:
        self.portal.call(self._pin, model, pinned)

    @precondition(lambda self: bool(self.requests))
    @rule(data=st.data())
    def cancel_one(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        with contextlib.suppress(ModeldError):  # finished, queued or loading: not running
            self.portal.call(self.manager.cancel_request, request_id)

    @rule(model=st.sampled_from(MODELS))
    def unload(self, model: str) -> None:
        with contextlib.suppress(ModeldError):
            self.portal.call(self.manager.unload, model)

    @rule()
    def drain(self) -> None:
        for future in list(self.requests.values()):
            future.result(timeout=60)

    @invariant()
    def never_over_budget(self) -> None:
        stats = self.portal.call(self.manager.statistics)
        assert stats.used_est_mb <= stats.budget_mb - stats.margin_mb

    @invariant()
    def at_most_one_inflight_per_instance(self) -> None:
        for instance in self.portal.call(self.manager.statistics).instances:
            assert instance.inflight <= 1
        assert all(count <= 1 for count in self.max_seen_inflight.values())

    @invariant()
    def fifo_within_a_model(self) -> None:
        for model, order in self.started.items():
            submitted = [r for r in self.submitted[model] if r in set(order)]
            assert order == submitted

    @invariant()
    def every_request_ends_at_most_once(self) -> None:
        assert all(len(ends) <= 1 for ends in self.endings.values())

    @invariant()
    def idle_unloads_only_idle_instances(self) -> None:
        assert self.busy_idle_unloads == []
        assert self.early_idle_unloads == []
        assert not any("idle" in ends for ends in self.endings.values())

    async def _expired_but_loaded(self) -> list[str]:
        await anyio.wait_all_tasks_blocked()
        now_s = self.clock.now_s()
        return [
            i.model_id
            for i in self.manager._pool.all()
            if (expires_s := i.expires_at_s()) is not None and expires_s <= now_s
        ]

    @invariant()
    def expired_instances_are_unloaded(self) -> None:
        assert self.portal.call(self._expired_but_loaded) == []

    def teardown(self) -> None:
        try:
            for future in list(self.requests.values()):
                future.result(timeout=60)
            assert set(self.endings) == set(self.requests), "a request never ended"
            allowed = {r.value for r in DoneReason} | {
                "queue_full",
                "queue_timeout",
                "memory_busy",
                "model_too_large",
            }
            for ends in self.endings.values():
                assert len(ends) == 1, ends
                assert ends[0] in allowed, ends
        finally:
            self.manager_cm.__exit__(None, None, None)
            self.portal_cm.__exit__(None, None, None)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
def test_scheduler_invariants(medium_model_dir: Path, token_loop: Any, anyio_backend: str) -> None:
    SchedulerMachine.models_dir = medium_model_dir
    SchedulerMachine.token_loop = token_loop
    run = SchedulerMachine.TestCase()
    run.settings = settings(
        max_examples=15,
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    run.runTest()
