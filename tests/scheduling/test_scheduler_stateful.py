"""A hypothesis state machine over the real scheduler and real tiny models.

Rules submit, cancel, unload and drain requests against three models in a budget that
holds two; after every step the invariants below must hold. The event loop runs in a
blocking portal so that hypothesis can drive it step by step.
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
from modeld.scheduling.manager import ModelManager
from modeld.sizes import MIB
from modeld.types import DoneReason, InferRequest
from tests.scheduling.conftest import ConstantProbe, estimate_bytes, make_settings

MODELS = ["med-a.gguf", "med-b.gguf", "med-c.gguf"]


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
        )
        self.manager = ModelManager(settings_, token_loop=self.token_loop, probe=ConstantProbe())
        # The manager's task group must live in one task: let the portal host it.
        self.manager_cm = self.portal.wrap_async_context_manager(self.manager)
        self.manager_cm.__enter__()
        self.requests: dict[str, Future[Any]] = {}
        self.endings: dict[str, list[str]] = defaultdict(list)
        self.submitted: dict[str, list[str]] = defaultdict(list)
        self.started: dict[str, list[str]] = defaultdict(list)
        self.max_seen_inflight: dict[str, int] = defaultdict(int)
        self.counter = 0

    async def _request(self, request_id: str, model: str, max_tokens: int) -> None:
        try:
            request = InferRequest(prompt="hi", model=model, max_tokens=max_tokens, temperature=0)
            async with self.manager.stream(request, request_id=request_id) as generation:
                self.started[model].append(request_id)
                busy = sum(1 for g in self.manager._generations.values() if g.model_id == model)
                self.max_seen_inflight[model] = max(self.max_seen_inflight[model], busy)
                async for _ in generation:
                    await anyio.lowlevel.checkpoint()
            assert generation.result is not None
            self.endings[request_id].append(str(generation.result.done_reason))
        except ModeldError as exc:
            self.endings[request_id].append(exc.code)
        except anyio.get_cancelled_exc_class():
            self.endings[request_id].append("task-cancelled")
            raise

    @rule(model=st.sampled_from(MODELS), max_tokens=st.integers(1, 40))
    def submit(self, model: str, max_tokens: int) -> None:
        self.counter += 1
        request_id = f"r{self.counter}"
        self.submitted[model].append(request_id)
        self.requests[request_id] = self.portal.start_task_soon(
            self._request, request_id, model, max_tokens
        )
        self.portal.call(anyio.wait_all_tasks_blocked)

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
