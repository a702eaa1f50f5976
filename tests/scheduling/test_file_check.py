"""A loaded model's file is checked on its worker, as the first step of each request
(scheduling/file_check.py): one ``stat()`` there, the full lookup on the event loop only
when it does not pass. Real models and files; the registry is subclassed only to make
the worker's ``stat()`` hang or fail, which a real filesystem cannot be made to do here.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import anyio
import pytest

from modeld import errors
from modeld.engine.base import TokenLoop
from modeld.registry import ModelFile, Registry
from modeld.scheduling.manager import ModelManager
from modeld.types import DoneReason, InferRequest, InstanceState
from tests.scheduling.conftest import ConstantProbe, make_settings

pytestmark = pytest.mark.anyio

MODEL = "tiny-a.gguf"
HANG_LIMIT_S = 30  # an injected hang never outlives its test


def ask(max_tokens: int = 4) -> InferRequest:
    return InferRequest(prompt="hello", model=MODEL, max_tokens=max_tokens, temperature=0.0)


class WorkerStatRegistry(Registry):
    """The worker's quick check hangs while ``answering`` is clear, or fails ``fails``
    times (the full lookup still sees the real file); ``quick`` counts the checks."""

    def __init__(self, models_dir: Path, answering: threading.Event, fails: int = 0) -> None:
        super().__init__(models_dir, timeout_s=0.3)
        self._answering = answering
        self.fails = fails
        self.quick: list[str] = []  # the thread of each quick check

    def unchanged(self, model: ModelFile) -> bool:
        self.quick.append(threading.current_thread().name)
        self._answering.wait(HANG_LIMIT_S)
        if self.fails:
            self.fails -= 1
            return False
        return super().unchanged(model)


def manager_with(models_dir: Path, token_loop: TokenLoop, registry: Registry) -> ModelManager:
    settings = make_settings(models_dir)
    return ModelManager(settings, token_loop=token_loop, probe=ConstantProbe(), registry=registry)


async def test_the_file_is_checked_on_the_models_worker_and_a_replaced_one_is_caught(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    answering = threading.Event()
    answering.set()
    registry = WorkerStatRegistry(models_dir, answering)
    async with manager_with(models_dir, token_loop, registry) as manager:
        _, first = await manager.complete(ask())
        _, again = await manager.complete(ask())
        assert (first.done_reason, again.done_reason) == (DoneReason.LENGTH, DoneReason.LENGTH)
        assert len(registry.quick) == 2  # each request's first step
        assert threading.current_thread().name not in registry.quick  # on the worker
        assert manager.counters[MODEL].loads_total == 1
        staged = models_dir / "staged.tmp"
        staged.write_bytes((models_dir / "tiny-b.gguf").read_bytes())
        os.replace(staged, models_dir / MODEL)
        text_b, _ = await manager.complete(
            InferRequest(prompt="hello", model="tiny-b.gguf", max_tokens=4, temperature=0.0)
        )
        text_a, _ = await manager.complete(ask())
        assert text_a == text_b  # the new weights: the next request caught the change
        assert manager.counters[MODEL].loads_total == 2
        loaded = next(i for i in manager.statistics().instances if i.model_id == MODEL)
        assert loaded.state is InstanceState.READY


async def test_a_failed_quick_check_of_an_unchanged_file_goes_on_on_the_same_instance(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    answering = threading.Event()
    answering.set()
    registry = WorkerStatRegistry(models_dir, answering)
    async with manager_with(models_dir, token_loop, registry) as manager:
        await manager.complete(ask())
        registry.fails = 1  # e.g. a stat() that raced with a rename back
        _, result = await manager.complete(ask())
        assert result.done_reason is DoneReason.LENGTH
        assert len(registry.quick) == 2  # the full lookup found the same file: no re-check
        assert manager.counters[MODEL].loads_total == 1  # not reloaded


async def test_a_stalled_check_on_the_worker_is_answered_in_time_and_the_model_stays_busy(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    answering = threading.Event()
    answering.set()
    registry = WorkerStatRegistry(models_dir, answering)
    try:
        async with manager_with(models_dir, token_loop, registry) as manager:
            await manager.complete(ask())
            answering.clear()  # the mount stops answering
            started_s = time.monotonic()
            with pytest.raises(errors.ModelsDirUnavailable):
                await manager.complete(ask())
            assert time.monotonic() - started_s < HANG_LIMIT_S / 2  # the registry's deadline
            instance = manager.statistics().instances[0]
            assert instance.inflight == 1  # busy, visibly, while its worker is in stat()
            answering.set()
            with anyio.fail_after(HANG_LIMIT_S):  # in line behind the stalled one
                _, result = await manager.complete(ask())
            assert result.done_reason is DoneReason.LENGTH
            assert manager.statistics().instances[0].inflight == 0
            assert manager.counters[MODEL].loads_total == 1
    finally:
        answering.set()
