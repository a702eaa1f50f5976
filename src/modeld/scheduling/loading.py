"""How one instance is loaded: header, estimate, memory, engine, warm-up, measurement.

A :class:`Loader` does the work of a load and raises a :class:`ModeldError` when it fails;
the pool keeps the instance's state and counters around it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from loguru import logger

from modeld.config import Settings
from modeld.engine.base import TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.worker import EngineWorker
from modeld.errors import ModeldError, ModelLoadFailed, ResourcesExhausted
from modeld.gguf import read_gguf_header
from modeld.memory.budget import MemoryBudget
from modeld.memory.estimate import (
    FootprintEstimate,
    embedding_context_bytes,
    estimate_footprint,
)
from modeld.memory.probe import MemoryProbe
from modeld.registry import ModelFile
from modeld.scheduling.events import EventHub, ModelLoadingProgress
from modeld.scheduling.instance import Instance
from modeld.types import context_sizes, embedding_context_sizes

__all__ = ["EngineFactory", "Loader", "Reserve", "out_of_descriptors"]

_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})

EngineFactory = Callable[[ModelFile, EngineSettings, TokenLoop, int], LlamaEngine]
Reserve = Callable[[Instance, int], Awaitable[None]]


def _default_engine_factory(
    model: ModelFile, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
) -> LlamaEngine:
    return LlamaEngine(model.path, settings, loop, n_ctx_train)


class Loader:
    """Loads instances, one measured load at a time."""

    def __init__(
        self,
        settings: Settings,
        *,
        events: EventHub,
        token_loop: TokenLoop,
        probe: MemoryProbe,
        budget: MemoryBudget,
        gpu: bool,
        engine_factory: EngineFactory | None = None,
    ) -> None:
        self.settings = settings
        self._events = events
        self._loop = token_loop
        self._probe = probe
        self._budget = budget
        self._gpu = gpu
        self._engine_factory = engine_factory or _default_engine_factory
        self._measuring: Instance | None = None  # the load whose memory growth is measured
        self._measuring_ended = anyio.Event()

    async def load(self, instance: Instance, reserve: Reserve) -> None:
        """Give ``instance`` a warmed-up engine on its own worker and charge it.

        ``reserve`` makes room in the budget for the estimate (it may evict or wait).
        Raises a :class:`ModeldError` (:class:`ResourcesExhausted` when out of file
        descriptors); the worker and engine made so far are left on ``instance`` for the
        caller to dispose of.
        """
        try:
            await self._load(instance, reserve)
        except ModeldError as exc:
            shortage = out_of_descriptors(exc)
            if shortage is None:
                raise
            raise shortage from exc
        except OSError as exc:
            raise out_of_descriptors(exc) or _load_failed(instance.model, exc) from exc
        except Exception as exc:  # a bug or an unexpected engine failure: still contained
            raise _load_failed(instance.model, exc) from exc

    async def _load(self, instance: Instance, reserve: Reserve) -> None:
        model, settings = instance.model, self.settings
        engine_settings = self._engine_settings(model.id)
        header = await anyio.to_thread.run_sync(lambda: read_gguf_header(model.path))
        sizes = context_sizes(engine_settings.n_ctx, settings.n_batch, header.context_length)
        estimate = estimate_footprint(
            header,
            n_ctx=sizes.n_ctx,
            n_gpu_layers=engine_settings.n_gpu_layers,
            n_batch=sizes.n_batch,
            gpu=self._gpu,
        )
        instance.embedding_bytes = embedding_context_bytes(
            header,
            n_tokens=embedding_context_sizes(sizes).n_ubatch,
            n_gpu_layers=engine_settings.n_gpu_layers,
            gpu=self._gpu,
        )
        self._progress(model.id, "validated", 0.1)
        await reserve(instance, estimate.total_bytes)
        self._progress(model.id, "memory_reserved", 0.2)
        async with self._measurement(instance) as measured:
            before_bytes = self._probe.used_bytes() if measured else 0
            worker = instance.worker = EngineWorker(f"modeld:{model.id}")
            engine = instance.engine = await worker.run(
                lambda: self._engine_factory(
                    model, engine_settings, self._loop, header.context_length
                )
            )
            self._progress(model.id, "weights_loaded", 0.9)
            await worker.run(engine.warm_up)
            measured_bytes = self._probe.used_bytes() - before_bytes if measured else 0
        self._budget.charge(model.id, self._charge_after_load(measured_bytes, estimate, engine))
        instance.charge_bytes = self._budget.charge_of(model.id)
        instance.measured = measured

    def _engine_settings(self, model_id: str) -> EngineSettings:
        """The global settings, with the model's own ``[models."<id>"]`` values on top."""
        settings = self.settings
        own = settings.model(model_id)
        return EngineSettings(
            n_ctx=own.n_ctx if own.n_ctx is not None else settings.n_ctx,
            n_batch=settings.n_batch,
            n_threads=own.threads if own.threads is not None else settings.n_threads,
            n_gpu_layers=own.n_gpu_layers
            if own.n_gpu_layers is not None
            else settings.n_gpu_layers,
            use_mmap=not settings.no_mmap,
        )

    @asynccontextmanager
    async def _measurement(self, instance: Instance) -> AsyncIterator[bool]:
        """Loads take turns so that the probe's growth across one belongs to it alone;
        yields whether this load is measured.

        A load that has run past ``--load-timeout`` (hung inside llama.cpp) no longer
        holds the others back: they go ahead unmeasured, charged their estimate.
        """
        while self._measuring is not None:
            stalled_at_s = self._measuring.loading_since_s + self.settings.load_timeout
            if time.monotonic() >= stalled_at_s:
                logger.warning(
                    "load goes ahead unmeasured: another load is stalled",
                    model=instance.model_id,
                    stalled=self._measuring.model_id,
                )
                yield False
                return
            with anyio.move_on_after(stalled_at_s - time.monotonic()):
                await self._measuring_ended.wait()
        self._measuring = instance
        try:
            yield True
        finally:
            self._measuring = None
            self._measuring_ended.set()
            self._measuring_ended = anyio.Event()

    def _progress(self, model_id: str, stage: str, fraction: float) -> None:
        """Load stages as events. llama-cpp-python 0.3.36's ``Llama`` exposes no hook for
        llama.cpp's progress callback, so progress is reported per stage, not per tensor."""
        self._events.publish(ModelLoadingProgress(model=model_id, stage=stage, progress=fraction))

    def _charge_after_load(
        self, measured_bytes: int, estimate: FootprintEstimate, engine: LlamaEngine
    ) -> int:
        """What a loaded instance costs the budget from now on.

        On a GPU, NVML's per-process growth across the load replaces the estimate (floored
        by llama.cpp's own weight + KV sizes). On CPU, RSS right after warm-up misses the
        compute buffer and KV pages that are allocated but not yet touched, so the estimate
        stays the floor there and a larger measurement replaces it. An unmeasured load is
        charged the same floors.
        """
        reported_bytes = engine.model_size_bytes + estimate.kv_cache_bytes
        if self._probe.kind == "nvml":
            return max(measured_bytes, reported_bytes)
        return max(measured_bytes, reported_bytes, estimate.total_bytes)


def out_of_descriptors(error: BaseException) -> ResourcesExhausted | None:
    """EMFILE/ENFILE, raised directly or behind a modeld error: a passing shortage, not
    a bad model file (no cooldown)."""
    cause: BaseException | None = error
    for _ in range(8):  # a chain of causes is short; never follow a cycle
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno in _OUT_OF_DESCRIPTORS:
            return ResourcesExhausted(f"out of file descriptors: {cause.strerror}")
        cause = cause.__cause__
    return None


def _load_failed(model: ModelFile, error: Exception) -> ModelLoadFailed:
    return ModelLoadFailed(f"{model.id}: {error!r}")
