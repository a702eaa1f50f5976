"""How one instance is loaded: header, estimate, memory, engine, warm-up, measurement.

A :class:`Loader` does the work of a load and raises a :class:`ModeldError` when it fails;
the pool keeps the instance's state and counters around it.
"""

from __future__ import annotations

import errno
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import anyio
from loguru import logger

from modeld.engine.base import TokenLoop
from modeld.engine.contract import Engine
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.worker import EngineWorker
from modeld.errors import ModeldError, ModelLoadFailed, ResourcesExhausted
from modeld.events import EventHub, ModelLoadingProgress
from modeld.gguf import OpenGguf
from modeld.memory.budget import MemoryBudget
from modeld.memory.estimate import (
    FootprintEstimate,
    embedding_context_bytes,
    estimate_footprint,
)
from modeld.memory.probe import MemoryProbe
from modeld.prompt_cache import Namespace, PromptCache
from modeld.redact import redact_paths
from modeld.registry import ModelFile
from modeld.scheduling.file_guard import FileGuard
from modeld.scheduling.instance import Instance
from modeld.scheduling.threads import ThreadBudget
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings
from modeld.sizes import MIB
from modeld.types import context_sizes, embedding_context_sizes

__all__ = ["PROCESS_CHARGE_ID", "EngineFactory", "Loader", "Reserve", "out_of_descriptors"]

_OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE})
# The budget entry for device memory the process holds outside any instance (the CUDA
# context, loaded kernels). No model id can take it: check_model_id wants "*.gguf".
PROCESS_CHARGE_ID = "(process)"
# What a failed load may leave behind without being charged for it: allocator slack.
LEAK_TOLERANCE_BYTES = 32 * MIB

EngineFactory = Callable[[ModelFile, EngineSettings, TokenLoop, int], Engine]
Reserve = Callable[[Instance, int], Awaitable[None]]


def _default_engine_factory(
    model: ModelFile, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
) -> LlamaEngine:
    return LlamaEngine(model.path, settings, loop, n_ctx_train, label=model.id)


class Loader:
    """Loads instances, one measured load at a time."""

    def __init__(
        self,
        settings: LiveSettings,
        *,
        events: EventHub,
        token_loop: TokenLoop,
        probe: MemoryProbe,
        budget: MemoryBudget,
        gpu: bool,
        threads: ThreadBudget,
        engine_factory: EngineFactory | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self._live = settings
        self._threads = threads
        self._prompt_cache = prompt_cache
        self._events = events
        self._loop = token_loop
        self._probe = probe
        self._budget = budget
        self._gpu = gpu
        self._engine_factory = engine_factory or _default_engine_factory
        self.guard = FileGuard(settings)
        self._measuring: Instance | None = None  # the load whose memory growth is measured
        self._measuring_ended = anyio.Event()
        self._process_bytes: int | None = None  # measured by the first load on NVML

    @property
    def process_bytes(self) -> int:
        """The process's own device memory, charged as ``PROCESS_CHARGE_ID`` (0 until
        measured, and on CPU)."""
        return self._process_bytes or 0

    @property
    def settings(self) -> Settings:
        return self._live.current

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
        """Open the file once: validation, the probe load and llama.cpp all read the
        inode behind that one descriptor (see :class:`OpenGguf`)."""
        model = instance.model
        opened = await anyio.to_thread.run_sync(lambda: OpenGguf(model.path, model.id))
        try:
            instance.model = replace(model, identity=opened.identity)  # what is loaded
            await self._load_opened(instance, opened, reserve)
        finally:
            opened.close()

    async def _load_opened(self, instance: Instance, opened: OpenGguf, reserve: Reserve) -> None:
        model, settings = instance.model, self.settings
        engine_settings = self._engine_settings(model.id)
        header = await anyio.to_thread.run_sync(opened.header)
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
        self._progress(instance, "validated", 0.1)
        if await self.guard.vet(opened, header.context_length):
            self._progress(instance, "probe_loaded", 0.15)
        bound = replace(model, path=Path(opened.load_path))

        def make_engine() -> Engine:
            return self._engine_factory(bound, engine_settings, self._loop, header.context_length)

        if (
            self._process_bytes is None
            and self._probe.kind == "nvml"
            and self._budget.could_ever_fit(estimate.total_bytes)  # else refused by reserve
        ):
            await self._measure_process_bytes(instance, make_engine)
        await reserve(instance, estimate.total_bytes)
        self._progress(instance, "memory_reserved", 0.2)
        async with self._measurement(instance) as measured:
            before_bytes = self._probe.used_bytes() if measured else 0
            worker = instance.worker = EngineWorker(f"modeld:{model.id}")
            try:
                engine = instance.engine = await worker.run(
                    lambda: self.guard.staged(model.id, model.identity, "load", make_engine)
                )
            except BaseException:
                if measured:
                    self._keep_charged_what_stayed(model.id, before_bytes)
                raise
            self._progress(instance, "weights_loaded", 0.9)
            warm_up = self._threads.leased(instance, engine, engine.warm_up)  # a pool starts
            try:
                await worker.run(
                    lambda: self.guard.staged(model.id, model.identity, "warm_up", warm_up)
                )
            finally:
                self._threads.give_back(instance)
            if self._prompt_cache is not None:  # after the warm-up: no lookup for it
                sizes = engine.sizes
                engine.attach_prompt_cache(
                    self._prompt_cache.for_model(
                        Namespace.of(
                            model.id, model.identity, sizes.n_ctx, sizes.n_batch, sizes.n_ubatch
                        )
                    )
                )
            measured_bytes = self._probe.used_bytes() - before_bytes if measured else 0
        self._budget.charge(model.id, self._charge_after_load(measured_bytes, estimate, engine))
        instance.charge_bytes = self._budget.charge_of(model.id)
        instance.measured = measured

    async def _measure_process_bytes(
        self, instance: Instance, make_engine: Callable[[], Engine]
    ) -> None:
        """Charge the device memory this process keeps whatever is loaded: the CUDA
        context and the kernels loaded on first use (586 MiB on an H200 with CUDA 13).

        The first load creates it, so its growth would otherwise be charged to that one
        instance, and evicting the instance would leave it uncharged for good. Measured
        once, on NVML, in the measured turn before any instance holds device memory: load
        the model, warm it up, close it, and keep what remains. Costs the first load one
        extra load.
        """
        async with self._measurement(instance) as measured:
            if self._process_bytes is not None or not measured:
                return  # measured by a load that had its turn first, or not attributable
            worker = EngineWorker(f"modeld:{instance.model_id}:measure")
            try:
                before_bytes = self._probe.used_bytes()
                engine = await worker.run(make_engine)
                try:
                    await worker.run(engine.warm_up)
                finally:
                    await worker.run(engine.close)
                self._process_bytes = max(0, self._probe.used_bytes() - before_bytes)
            finally:
                await worker.shutdown()
            self._budget.charge(PROCESS_CHARGE_ID, self._process_bytes)

    def _keep_charged_what_stayed(self, model_id: str, before_bytes: int) -> None:
        """A failed load frees what llama.cpp allocated (the engine sees to it); what
        the probe still finds held afterwards stays charged, under its own name, for
        the life of the process: the budget never counts held memory as free."""
        try:
            held_bytes = self._probe.used_bytes() - before_bytes
        except ModeldError:
            return
        if held_bytes <= LEAK_TOLERANCE_BYTES:
            return
        key = f"{model_id} (failed load)"
        self._budget.charge(key, self._budget.charge_of(key) + held_bytes)
        logger.warning(
            "a failed load left memory held; it stays charged",
            model=model_id,
            held_mb=round(held_bytes / MIB, 1),
        )

    def _engine_settings(self, model_id: str) -> EngineSettings:
        """The model's settings in force (see ``Settings.resolve``)."""
        settings = self.settings
        model = settings.resolve(model_id)
        return EngineSettings(
            n_ctx=model.n_ctx,
            n_batch=settings.n_batch,
            n_threads=model.threads,
            n_gpu_layers=model.n_gpu_layers,
            use_mmap=not settings.no_mmap,
            prompt_reuse=settings.prompt_reuse,
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

    def _progress(self, instance: Instance, stage: str, fraction: float) -> None:
        """Load stages as events and on the instance (``/status``). llama-cpp-python
        0.3.36's ``Llama`` exposes no hook for llama.cpp's progress callback, so progress
        is reported per stage, not per tensor."""
        instance.load_stage, instance.load_progress = stage, fraction
        event = ModelLoadingProgress(model=instance.model_id, stage=stage, progress=fraction)
        self._events.publish(event)

    def _charge_after_load(
        self, measured_bytes: int, estimate: FootprintEstimate, engine: Engine
    ) -> int:
        """What a loaded instance costs the budget from now on.

        The probe's growth across the load (NVML on a GPU, RSS on CPU), floored by the
        estimate and by llama.cpp's own weight + KV sizes: right after warm-up neither
        device has seen a full batch yet (on CPU the compute buffer and KV pages are not
        touched; on a GPU cuBLAS and ggml-cuda's pool allocate on the first long prompt,
        +145 to +225 MiB per instance on an H200), and the charge must cover what the
        instance grows to. An unmeasured load is charged the same floors.
        """
        reported_bytes = engine.model_size_bytes + estimate.kv_cache_bytes
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
    return ModelLoadFailed(redact_paths(f"{model.id}: {error!r}"))
