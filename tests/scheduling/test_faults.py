"""Faults real llama.cpp cannot be made to produce on demand, injected through the
manager's seams (engine factory, registry): a close that fails, a worker that hangs in a
generation or a load, a models dir that stops answering, a slow tokenization. Each state
change must complete or roll back, and nothing may hang or block the event loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import pytest

from modeld import errors
from modeld.engine.base import LoopOutcome, TokenLoop, TokenRing
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.registry import ModelFile, Registry
from modeld.scheduling.manager import ModelManager
from modeld.types import DoneReason, InferRequest, SamplingParams
from tests.scheduling.conftest import ConstantProbe, make_settings

pytestmark = pytest.mark.anyio

MODEL = "tiny-a.gguf"
HANG_LIMIT_S = 30  # an injected hang never outlives its test


def ask(model: str = MODEL, max_tokens: int = 8) -> InferRequest:
    return InferRequest(prompt="hello", model=model, max_tokens=max_tokens, temperature=0.0)


class FaultyEngine(LlamaEngine):
    """A real engine with one fault switched on."""

    close_fails = False
    generate_gate: threading.Event | None = None  # generate blocks until set, ignoring cancel
    prepare_gate: threading.Event | None = None  # prepare blocks until set
    prepare_entered: threading.Event | None = None

    def close(self) -> None:
        super().close()
        if self.close_fails:
            raise RuntimeError("injected: close failed")

    def prepare(
        self, prompt: str, max_tokens: int | None = None, *, truncate: bool = False
    ) -> list[int]:
        if self.prepare_entered is not None:
            self.prepare_entered.set()
        if self.prepare_gate is not None:
            self.prepare_gate.wait(HANG_LIMIT_S)
        return super().prepare(prompt, max_tokens, truncate=truncate)

    def generate(
        self,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | None = None,
    ) -> LoopOutcome:
        if self.generate_gate is not None and params.max_tokens != 1:  # not the warm-up
            self.generate_gate.wait(HANG_LIMIT_S)
        return super().generate(ring, prompt_tokens, params, grammar)


def faulty(**faults: Any) -> Callable[..., LlamaEngine]:
    def factory(
        model: ModelFile, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
    ) -> LlamaEngine:
        engine = FaultyEngine(model.path, settings, loop, n_ctx_train)
        for name, value in faults.items():
            setattr(engine, name, value)
        return engine

    return factory


def hanging_load(
    release: threading.Event, model_id: str = MODEL, entered: threading.Event | None = None
) -> Callable[..., LlamaEngine]:
    """A factory whose load of ``model_id`` hangs (inside llama.cpp, as far as modeld can
    tell) until ``release`` is set; ``entered`` is set once it hangs."""

    def factory(
        model: ModelFile, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
    ) -> LlamaEngine:
        if model.id == model_id:
            if entered is not None:
                entered.set()
            release.wait(HANG_LIMIT_S)
        return LlamaEngine(model.path, settings, loop, n_ctx_train)

    return factory


def manager_with(
    models_dir: Path, token_loop: TokenLoop, factory: Callable[..., LlamaEngine], **kw: Any
) -> ModelManager:
    settings = make_settings(models_dir, **kw.pop("settings", {}))
    return ModelManager(
        settings, token_loop=token_loop, probe=ConstantProbe(), engine_factory=factory, **kw
    )


async def test_a_close_that_fails_still_frees_the_instance(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    async with manager_with(models_dir, token_loop, faulty(close_fails=True)) as manager:
        await manager.load(MODEL)
        await manager.unload(MODEL)  # does not raise: the instance goes either way
        assert manager.state_of(MODEL) == "unloaded"
        assert manager.statistics().used_est_mb == 0
        _, result = await manager.complete(ask())  # and loads again
        assert result.done_reason is DoneReason.LENGTH


async def test_shutdown_abandons_a_worker_hung_in_a_generation(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    gate = threading.Event()
    manager = manager_with(models_dir, token_loop, faulty(generate_gate=gate), close_timeout_s=0.5)
    try:
        async with manager:
            async with manager.stream(ask(max_tokens=50)) as generation:
                started_s = time.monotonic()
                with anyio.fail_after(10):
                    abandoned = await manager.shutdown(grace_s=0.2)
                took_s = time.monotonic() - started_s
                async for _ in generation:
                    pass
            assert abandoned == [MODEL]
            assert took_s < 0.2 + 0.5 + 2.0  # the grace, the close bound, slack
            assert generation.result is not None
            assert generation.result.done_reason is DoneReason.SHUTDOWN
            assert generation.result.error is not None
            stats = manager.statistics()
            assert (stats.instances, stats.used_est_mb, stats.running) == ((), 0, 0)
    finally:
        gate.set()


async def test_shutdown_abandons_a_load_hung_inside_llama_cpp(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    release = threading.Event()
    manager = manager_with(
        models_dir,
        token_loop,
        hanging_load(release),
        close_timeout_s=0.5,
        settings={"max_wait_ms": 50},
    )
    try:
        async with manager:
            with pytest.raises(errors.QueueTimeout):
                await manager.complete(ask())  # the load goes on, hung
            with anyio.fail_after(10):
                assert await manager.shutdown(grace_s=0.0) == [MODEL]
            assert manager.statistics().instances == ()
    finally:
        release.set()


async def test_a_stalled_load_does_not_hold_back_other_models(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    release, entered = threading.Event(), threading.Event()
    manager = manager_with(
        models_dir,
        token_loop,
        hanging_load(release, entered=entered),
        settings={"load_timeout": 0.3},
    )
    try:
        async with manager:
            async with anyio.create_task_group() as asking:
                asking.start_soon(manager.complete, ask())  # tiny-a's load starts and hangs
                # however slow the machine: until it hangs inside the load, holding its turn
                assert await anyio.to_thread.run_sync(entered.wait, 60)
                asking.cancel_scope.cancel()  # the waiter leaves; the load goes on
            with anyio.fail_after(60):
                _, result = await manager.complete(ask("tiny-b.gguf"))
            assert result.done_reason is DoneReason.LENGTH
            assert manager.stalled_loads() == [MODEL]
            b = next(i for i in manager.statistics().instances if i.model_id == "tiny-b.gguf")
            assert not b.measured  # it went ahead while tiny-a held the measurement
            release.set()
            await manager.load(MODEL)
            assert manager.is_ready(MODEL)
    finally:
        release.set()


class StallingRegistry(Registry):
    """A models dir whose stat() stops answering while ``stalled`` is clear."""

    def __init__(self, models_dir: Path, answering: threading.Event) -> None:
        super().__init__(models_dir, timeout_s=0.3)
        self._answering = answering

    def _inspect(self, model_id: str) -> ModelFile:
        self._answering.wait(HANG_LIMIT_S)
        return super()._inspect(model_id)


async def test_a_stalled_models_dir_fails_requests_and_never_blocks_the_loop(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    answering = threading.Event()
    registry = StallingRegistry(models_dir, answering)
    settings = make_settings(models_dir)
    ticks = 0
    manager = ModelManager(
        settings, token_loop=token_loop, probe=ConstantProbe(), registry=registry
    )
    try:
        async with manager, anyio.create_task_group() as tasks:

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await anyio.sleep(0.01)

            tasks.start_soon(tick)
            with pytest.raises(errors.ModelsDirUnavailable):
                await manager.complete(ask())
            assert ticks >= 10  # the loop ran on while stat() hung
            assert manager.statistics().admitted == 0
            with pytest.raises(errors.ModelsDirUnavailable):
                await manager.models()
            answering.set()
            _, result = await manager.complete(ask())
            assert result.done_reason is DoneReason.LENGTH
            tasks.cancel_scope.cancel()
    finally:
        answering.set()


async def test_the_model_stays_busy_while_a_left_request_is_still_tokenized(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    gate, entered = threading.Event(), threading.Event()
    manager = manager_with(
        models_dir, token_loop, faulty(prepare_gate=gate, prepare_entered=entered)
    )
    try:
        async with manager:
            await manager.load(MODEL)
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(manager.complete, ask())
                await anyio.to_thread.run_sync(entered.wait, HANG_LIMIT_S)  # worker has it
                tasks.cancel_scope.cancel()  # the client leaves while its prompt is tokenized
            instance = manager.statistics().instances[0]
            assert instance.inflight == 1  # busy, and visibly so, until the worker is done
            assert manager.statistics().admitted == 0
            gate.set()
            with anyio.fail_after(20):
                _, result = await manager.complete(ask())
            assert result.done_reason is DoneReason.LENGTH
            assert manager.statistics().instances[0].inflight == 0
    finally:
        gate.set()
