"""``ModelManager``: the scheduler behind every request, usable without HTTP.

Read it top to bottom: admission (global cap, queue depth), the instance (load on demand
inside the budget, evicting LRU idle ones), the FIFO slot, the generation, the release.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup

from modeld.config import Settings
from modeld.engine.base import LoopOutcome, StopCode, TokenLoop, TokenRing
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.worker import EngineWorker, WorkerStopped
from modeld.errors import (
    InferTimeout,
    InvalidRequest,
    MemoryBusy,
    ModelCoolingDown,
    ModeldError,
    ModelLoadFailed,
    ModelNotFound,
    ModelTooLarge,
    NoDefaultModel,
    QueueFull,
    QueueTimeout,
    RequestNotFound,
    ShuttingDown,
    TooManyInflight,
)
from modeld.memory.budget import Candidate, MemoryBudget, choose_victims
from modeld.memory.capacity import default_budget_mb, gpu_offload_available
from modeld.memory.estimate import FootprintEstimate, estimate_footprint
from modeld.memory.gguf_header import read_gguf_header
from modeld.memory.probe import MemoryProbe, detect_probe
from modeld.registry import ModelFile, Registry, check_model_id
from modeld.scheduling.events import EventHub
from modeld.scheduling.fifo import FifoSlot
from modeld.scheduling.generation import Generation, RequestTiming
from modeld.scheduling.instance import Instance, InstanceStatistics, ModelCounters
from modeld.types import Chunk, DoneReason, GenerationResult, InferRequest, InstanceState

__all__ = ["ManagerStatistics", "ModelManager"]

MIB = 1024 * 1024
_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class ManagerStatistics:
    budget_mb: int
    margin_mb: int
    used_est_mb: float
    server_time_unix: float
    uptime_seconds: float
    token_loop: str
    memory_probe: str
    admitted: int
    accepting: bool
    instances: tuple[InstanceStatistics, ...]


class ModelManager:
    """Owns the registry, the budget, every instance and every running generation.

    Use as an async context manager (asyncio or trio)::

        async with ModelManager(settings) as manager:
            async with manager.stream(InferRequest(prompt="Hi", model="m.gguf")) as gen:
                async for chunk in gen:
                    print(chunk.text, end="")
            print(gen.result)
    """

    def __init__(
        self,
        settings: Settings,
        *,
        token_loop: TokenLoop | None = None,
        probe: MemoryProbe | None = None,
        events: EventHub | None = None,
        engine_factory: Callable[[ModelFile, EngineSettings, TokenLoop, int], LlamaEngine]
        | None = None,
    ) -> None:
        self.settings = settings
        self.registry = Registry(settings.models_path)
        self.events = events or EventHub()
        self._gpu = settings.n_gpu_layers != 0 and gpu_offload_available()
        if token_loop is None:
            from modeld.engine.select import token_loop as select_token_loop

            token_loop = select_token_loop(settings.token_loop)
        self._loop = token_loop
        self._probe = probe or detect_probe(prefer_gpu=self._gpu)
        budget_mb = settings.vram_budget_mb or default_budget_mb(self._gpu)
        self._budget = MemoryBudget(budget_mb, min(settings.vram_margin_mb, budget_mb))
        self._engine_factory = engine_factory or (
            lambda model, engine_settings, loop, n_ctx_train: LlamaEngine(
                model.path, engine_settings, loop, n_ctx_train
            )
        )
        self._instances: dict[str, Instance] = {}
        self._slots: dict[str, FifoSlot] = {}
        self._counters: dict[str, ModelCounters] = {}
        self._generations: dict[str, Generation] = {}
        self._admitted = 0
        self._accepting = True
        self._memory_changed = anyio.Event()
        self._load_lock = anyio.Lock()
        self._started_s = time.monotonic()
        self._generation_s_ewma = 1.0
        self._task_group: TaskGroup | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self.registry.scan()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.shutdown(grace_s=0.0)
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def shutdown(self, grace_s: float) -> None:
        """Stop admitting, let running streams finish for ``grace_s``, then cancel them
        (done_reason ``shutdown``) and close every instance. Idempotent."""
        self._accepting = False
        with anyio.move_on_after(grace_s):
            while self._generations:
                await self._wait_memory_changed(None)
        for generation in list(self._generations.values()):
            generation.cancel(DoneReason.SHUTDOWN)
        for instance in list(self._instances.values()):
            await self._unload(instance, DoneReason.SHUTDOWN)

    @property
    def accepting(self) -> bool:
        return self._accepting

    @property
    def token_loop_kind(self) -> str:
        return str(self._loop.kind)

    # ----------------------------------------------------------------- queries

    def models(self) -> list[ModelFile]:
        """Rescan the models dir (files added later are found without a restart)."""
        return self.registry.scan()

    def state_of(self, model_id: str) -> str:
        instance = self._instances.get(model_id)
        return str(instance.state) if instance else "unloaded"

    def is_ready(self, model_id: str | None = None) -> bool:
        if model_id is not None:
            instance = self._instances.get(model_id)
            return instance is not None and instance.state is InstanceState.READY
        return any(i.state is InstanceState.READY for i in self._instances.values())

    def _cooling_down(self, now_s: float) -> list[InstanceStatistics]:
        """Models with no instance whose last load failed: shown as ``error`` with the
        error and the time left before a retry, so the cooldown is visible."""
        return [
            InstanceStatistics(
                model_id=model_id,
                state=InstanceState.ERROR,
                last_used_unix=0.0,
                est_vram_mb=0.0,
                measured=False,
                queue_len=self._slot_for(model_id).queue_len,
                inflight=0,
                loads_total=counters.loads_total,
                evictions_total=counters.evictions_total,
                last_error=counters.last_error,
                uptime_seconds=0.0,
                pinned=False,
                retry_in_seconds=round(counters.retry_at_s - now_s, 3),
            )
            for model_id, counters in self._counters.items()
            if model_id not in self._instances and counters.retry_at_s > now_s
        ]

    def stalled_loads(self) -> list[str]:
        """Models whose load has run past ``--load-timeout``: the watchdog's signal."""
        limit_s = time.monotonic() - self.settings.load_timeout
        return [
            i.model_id
            for i in self._instances.values()
            if i.state is InstanceState.LOADING and i.loading_since_s < limit_s
        ]

    def statistics(self) -> ManagerStatistics:
        now_s, now_unix = time.monotonic(), time.time()
        return ManagerStatistics(
            budget_mb=self._budget.budget_mb,
            margin_mb=self._budget.margin_mb,
            used_est_mb=round(self._budget.used_bytes / MIB, 3),
            server_time_unix=now_unix,
            uptime_seconds=round(now_s - self._started_s, 3),
            token_loop=str(self._loop.kind),
            memory_probe=self._probe.kind,
            admitted=self._admitted,
            accepting=self._accepting,
            instances=tuple(
                sorted(
                    [i.statistics(now_s, now_unix) for i in self._instances.values()]
                    + self._cooling_down(now_s),
                    key=lambda stats: stats.model_id,
                )
            ),
        )

    # ----------------------------------------------------------------- generation

    @asynccontextmanager
    async def stream(
        self, request: InferRequest, *, request_id: str | None = None
    ) -> AsyncIterator[Generation]:
        """Admit, load, queue and start one generation; yields it once the loop runs.

        Raises before yielding: :class:`InvalidRequest`, :class:`ModelNotFound`,
        :class:`NoDefaultModel`, :class:`ModelInvalid`, :class:`ModelTooLarge`,
        :class:`ModelLoadFailed`, the :class:`Overloaded` family (429/503),
        :class:`ShuttingDown`. Leaving the block early cancels the generation.
        """
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._generations:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        model = self._resolve(request.model)
        self._admit(model.id)
        try:
            generation = await self._start(model, request, request_id)
            try:
                yield generation
            finally:
                await generation.aclose()
        finally:
            self._admitted -= 1

    async def generate(
        self, request: InferRequest, *, request_id: str | None = None
    ) -> AsyncIterator[Chunk | GenerationResult]:
        """Chunks as they come, then the one :class:`GenerationResult`."""
        async with self.stream(request, request_id=request_id) as generation:
            async for chunk in generation:
                yield chunk
        assert generation.result is not None
        yield generation.result

    async def complete(
        self, request: InferRequest, *, request_id: str | None = None
    ) -> tuple[str, GenerationResult]:
        """The whole text and the result, for callers that do not stream."""
        parts: list[str] = []
        async with self.stream(request, request_id=request_id) as generation:
            async for chunk in generation:
                parts.append(chunk.text)
        assert generation.result is not None
        return "".join(parts), generation.result

    def cancel_request(self, request_id: str) -> None:
        """Cancel a running generation by id. Raises :class:`RequestNotFound`."""
        generation = self._generations.get(request_id)
        if generation is None:
            raise RequestNotFound(f"no running request {request_id!r}")
        generation.cancel(DoneReason.CANCELLED)

    def _resolve(self, model_id: str | None) -> ModelFile:
        model_id = model_id or self.settings.default_model
        if not model_id:
            raise NoDefaultModel("no model given and no --default-model configured")
        return self.registry.resolve(model_id)

    def _admit(self, model_id: str) -> None:
        if not self._accepting:
            raise ShuttingDown("modeld is shutting down")
        cap = self.settings.max_inflight
        if cap is not None and self._admitted >= cap:
            raise TooManyInflight(
                f"{self._admitted} requests in flight (cap {cap})", self._retry_after_s(cap)
            )
        slot = self._slot_for(model_id)
        depth = self.settings.max_queue_depth
        if slot.busy and slot.queue_len >= depth:
            raise QueueFull(
                f"{model_id}: {slot.queue_len} requests queued (depth {depth})",
                self._retry_after_s(slot.queue_len),
            )
        self._admitted += 1

    def _retry_after_s(self, ahead: int) -> float:
        """Requests ahead times the recent mean generation time, at least a second."""
        return float(max(1, math.ceil(ahead * self._generation_s_ewma)))

    async def _start(self, model: ModelFile, request: InferRequest, request_id: str) -> Generation:
        timing = RequestTiming()
        deadline_s = timing.admitted_s + self.settings.max_wait_ms / 1000
        timeout = self.settings.infer_timeout
        if timeout is not None and timing.admitted_s + timeout < deadline_s:
            deadline_s = timing.admitted_s + timeout
            try:
                with anyio.fail_after(max(0.0, deadline_s - time.monotonic())):
                    # the inner deadline only bounds the load's memory wait; this scope,
                    # a moment earlier, is the one that fires
                    inner_deadline_s = deadline_s + 1.0
                    return await self._start_within(
                        model, request, request_id, timing, inner_deadline_s
                    )
            except TimeoutError:
                raise InferTimeout(
                    f"{model.id}: not started within --infer-timeout ({timeout:g} s)"
                ) from None
        return await self._start_within(model, request, request_id, timing, deadline_s)

    async def _start_within(
        self,
        model: ModelFile,
        request: InferRequest,
        request_id: str,
        timing: RequestTiming,
        deadline_s: float,
    ) -> Generation:
        # The model's queue is joined first and held across the load, so the order of
        # arrival is the order of service, whatever happens to the instance meanwhile.
        slot = self._slot_for(model.id)
        if slot.busy and slot.queue_len >= self.settings.max_queue_depth:
            raise QueueFull(f"{model.id}: queue is full", self._retry_after_s(slot.queue_len))
        try:
            await slot.acquire(max(0.0, deadline_s - time.monotonic()))
        except TimeoutError:
            raise QueueTimeout(
                f"{model.id}: waited {self.settings.max_wait_ms} ms in the queue",
                self._retry_after_s(slot.queue_len + 1),
            ) from None
        try:
            while True:
                load_started_s = time.monotonic()
                instance = await self._ready_instance(model, deadline_s)
                timing.load_s += time.monotonic() - load_started_s
                generation = await self._launch(instance, request, request_id, timing)
                if generation is not None:
                    return generation
                # unloaded between the load and the launch: load it again, still first
        except BaseException:
            slot.release()
            raise

    def _slot_for(self, model_id: str) -> FifoSlot:
        """One FIFO per model, outliving its instances."""
        slot = self._slots.get(model_id)
        if slot is None:
            slot = self._slots[model_id] = FifoSlot()
        return slot

    async def _launch(
        self, instance: Instance, request: InferRequest, request_id: str, timing: RequestTiming
    ) -> Generation | None:
        """Tokenize and start the loop; None when the instance went away meanwhile."""
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None:
            return None
        try:
            prompt_tokens = await worker.run(lambda: engine.tokenize(request.prompt))
        except WorkerStopped:
            return None
        if not instance.is_ready():
            return None
        if len(prompt_tokens) + request.max_tokens > engine.n_ctx:
            raise InvalidRequest(
                f"prompt ({len(prompt_tokens)} tokens) + max_tokens ({request.max_tokens}) "
                f"exceeds the context of {engine.n_ctx} tokens",
                field="max_tokens",
            )
        ring = self._loop.new_ring()
        params = request.sampling()
        call = worker.submit(lambda: _run_loop(engine, ring, prompt_tokens, params))
        timing.started_s = time.monotonic()
        instance.last_used_s = timing.started_s
        timeout = self.settings.infer_timeout
        generation = Generation(
            request_id=request_id,
            model_id=instance.model_id,
            ring=ring,
            call=call,
            timing=timing,
            deadline_s=timing.admitted_s + timeout if timeout else None,
            on_finished=lambda g: self._finished(instance, g, timing),
        )
        instance.active = generation
        self._generations[request_id] = generation
        return generation

    def _finished(self, instance: Instance, generation: Generation, timing: RequestTiming) -> None:
        now_s = time.monotonic()
        self._generation_s_ewma = 0.8 * self._generation_s_ewma + 0.2 * (now_s - timing.started_s)
        instance.last_used_s = now_s
        if instance.active is generation:
            instance.active = None
        self._generations.pop(generation.request_id, None)
        instance.slot.release()
        self._notify_memory_changed()
        result = generation.result
        if result is not None:
            metrics = result.metrics
            self.events.publish(
                "generation_finished",
                model=result.model,
                request_id=result.request_id,
                done_reason=str(result.done_reason),
                completion_tokens=metrics.completion_tokens,
                ttft_ms=metrics.ttft_ms,
                queue_ms=metrics.queue_ms,
                tokens_per_second=metrics.tokens_per_second,
            )

    # ----------------------------------------------------------------- instances

    async def load(self, model_id: str, *, pin: bool | None = None) -> InstanceStatistics:
        """Load (and warm) a model now; optionally pin it against eviction."""
        model = self.registry.resolve(model_id)
        deadline_s = time.monotonic() + self.settings.load_timeout
        instance = await self._ready_instance(model, deadline_s)
        if pin is not None:
            instance.pinned = pin
        return instance.statistics(time.monotonic(), time.time())

    async def unload(self, model_id: str) -> None:
        """Unload a model, cancelling its running generation (done_reason ``evicted``).

        Raises :class:`ModelNotFound` when it is not loaded.
        """
        instance = self._instances.get(check_model_id(model_id))
        if instance is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded")
        await self._unload(instance, DoneReason.EVICTED)

    async def _ready_instance(self, model: ModelFile, deadline_s: float) -> Instance:
        while True:
            if not self._accepting:
                raise ShuttingDown("modeld is shutting down")
            instance = self._instances.get(model.id)
            if instance is None:
                instance = self._begin_load(model, deadline_s)
            if instance.state is InstanceState.UNLOADING:
                await instance.gone.wait()
                continue
            if instance.state is InstanceState.READY:
                if self._file_changed(instance):
                    await self._unload(instance, DoneReason.EVICTED)
                    continue
                return instance
            with anyio.move_on_after(max(0.0, deadline_s - time.monotonic())) as scope:
                await instance.settled.wait()
            if scope.cancelled_caught:
                raise QueueTimeout(f"{model.id}: still loading after the request's max wait", 1.0)
            if instance.state is InstanceState.ERROR:
                assert instance.error is not None
                raise instance.error

    def _file_changed(self, instance: Instance) -> bool:
        """A file rewritten in place under a loaded (mmapped) model must not be used."""
        try:
            current = self.registry.resolve(instance.model_id)
        except ModeldError:
            return True
        return (current.size_bytes, current.mtime_ns) != (
            instance.model.size_bytes,
            instance.model.mtime_ns,
        )

    def _begin_load(self, model: ModelFile, deadline_s: float) -> Instance:
        counters = self._counters.setdefault(model.id, ModelCounters())
        now_s = time.monotonic()
        if counters.retry_at_s > now_s:
            raise ModelCoolingDown(
                f"{model.id}: loading failed ({counters.last_error}); retrying is allowed in "
                f"{counters.retry_at_s - now_s:.1f} s",
                retry_after_s=math.ceil(counters.retry_at_s - now_s),
            )
        instance = Instance(
            model=model,
            counters=counters,
            slot=self._slot_for(model.id),
            last_used_s=now_s,
            loading_since_s=now_s,
        )
        self._instances[model.id] = instance
        assert self._task_group is not None, "use ModelManager as an async context manager"
        self._task_group.start_soon(self._load, instance, deadline_s, name=f"load {model.id}")
        return instance

    async def _load(self, instance: Instance, deadline_s: float) -> None:
        model, counters = instance.model, instance.counters
        started_s = time.monotonic()
        self.events.publish("model_load_started", model=model.id)
        try:
            header = await anyio.to_thread.run_sync(
                lambda: read_gguf_header(model.path, max_context_length=1 << 20)
            )
            n_ctx = min(self.settings.n_ctx, header.context_length)
            estimate = estimate_footprint(
                header,
                n_ctx=n_ctx,
                n_gpu_layers=self.settings.n_gpu_layers,
                n_batch=self.settings.n_batch,
                gpu=self._gpu,
            )
            self._progress(model.id, "validated", 0.1)
            await self._reserve(instance, estimate.total_bytes, deadline_s)
            self._progress(model.id, "memory_reserved", 0.2)
            async with self._load_lock:  # one load at a time: measurements stay attributable
                before_bytes = self._probe.used_bytes()
                worker = EngineWorker(f"modeld:{model.id}")
                instance.worker = worker
                engine_settings = EngineSettings(
                    n_ctx=self.settings.n_ctx,
                    n_batch=self.settings.n_batch,
                    n_threads=self.settings.n_threads,
                    n_gpu_layers=self.settings.n_gpu_layers,
                    use_mmap=not self.settings.no_mmap,
                )
                engine = await worker.run(
                    lambda: self._engine_factory(
                        model, engine_settings, self._loop, header.context_length
                    )
                )
                instance.engine = engine
                self._progress(model.id, "weights_loaded", 0.9)
                await worker.run(engine.warm_up)
                measured_bytes = self._probe.used_bytes() - before_bytes
            self._budget.charge(model.id, self._charge_after_load(measured_bytes, estimate, engine))
            instance.charge_bytes = self._budget.charge_of(model.id)
            instance.measured = True
        except ModeldError as exc:
            await self._fail_load(instance, exc)
        except Exception as exc:  # a bug or an unexpected engine failure: still contained
            await self._fail_load(instance, ModelLoadFailed(f"{model.id}: {exc!r}"))
        else:
            instance.transition(InstanceState.READY)
            instance.ready_at_s = time.monotonic()
            counters.loads_total += 1
            counters.consecutive_failures = 0
            counters.retry_at_s = 0.0
            self.events.publish(
                "model_ready", model=model.id, load_ms=round((time.monotonic() - started_s) * 1000)
            )
        finally:
            instance.settled.set()
            self._notify_memory_changed()

    def _progress(self, model_id: str, stage: str, fraction: float) -> None:
        """Load stages as events. llama-cpp-python 0.3.36's ``Llama`` exposes no hook for
        llama.cpp's progress callback, so progress is reported per stage, not per tensor."""
        self.events.publish(
            "model_loading_progress", model=model_id, stage=stage, progress=fraction
        )

    def _charge_after_load(
        self, measured_bytes: int, estimate: FootprintEstimate, engine: LlamaEngine
    ) -> int:
        """What a loaded instance costs the budget from now on.

        On a GPU, NVML's per-process growth across the load replaces the estimate (floored
        by llama.cpp's own weight + KV sizes). On CPU, RSS right after warm-up misses the
        compute buffer and KV pages that are allocated but not yet touched, so the estimate
        stays the floor there and a larger measurement replaces it.
        """
        reported_bytes = engine.model_size_bytes + estimate.kv_cache_bytes
        if self._probe.kind == "nvml":
            return max(measured_bytes, reported_bytes)
        return max(measured_bytes, reported_bytes, estimate.total_bytes)

    async def _fail_load(self, instance: Instance, error: ModeldError) -> None:
        counters = instance.counters
        counters.load_failures_total += 1
        counters.last_error = error.message
        if not isinstance(error, (MemoryBusy, QueueTimeout)):
            counters.consecutive_failures += 1
            backoff_s = min(
                _BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (counters.consecutive_failures - 1)
            )
            counters.retry_at_s = time.monotonic() + backoff_s
        instance.error = error
        instance.transition(InstanceState.ERROR)
        self.events.publish("model_error", model=instance.model_id, error=error.message)
        await self._dispose(instance)

    async def _reserve(self, instance: Instance, need_bytes: int, deadline_s: float) -> None:
        """Charge ``need_bytes`` to the budget, evicting LRU idle instances to make room.

        Raises :class:`ModelTooLarge` at once if it cannot fit an empty budget, and
        :class:`MemoryBusy` if only busy instances stand in the way past the deadline.
        """
        model_id = instance.model_id
        if not self._budget.could_ever_fit(need_bytes):
            raise ModelTooLarge(
                f"{model_id} needs about {need_bytes / MIB:.0f} MiB; the budget minus margin "
                f"is {self._budget.limit_bytes / MIB:.0f} MiB"
            )
        while True:
            others = [i for i in self._instances.values() if i is not instance]
            victims = choose_victims(
                (
                    Candidate(
                        i.model_id, self._budget.charge_of(i.model_id), i.last_used_s, i.evictable
                    )
                    for i in others
                ),
                need_bytes,
                self._budget.used_bytes,
                self._budget.limit_bytes,
            )
            if victims == []:
                self._budget.charge(model_id, need_bytes)
                instance.charge_bytes = need_bytes
                return
            if victims:
                for victim in victims:
                    await self._unload(self._instances[victim], DoneReason.EVICTED, eviction=True)
                continue
            if not await self._wait_memory_changed(deadline_s):
                raise MemoryBusy(
                    f"{model_id} needs {need_bytes / MIB:.0f} MiB held by busy models",
                    self._retry_after_s(1),
                )

    async def _wait_memory_changed(self, deadline_s: float | None) -> bool:
        event = self._memory_changed
        timeout_s = math.inf if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        with anyio.move_on_after(timeout_s):
            await event.wait()
            return True
        return False

    def _notify_memory_changed(self) -> None:
        self._memory_changed.set()
        self._memory_changed = anyio.Event()

    async def _unload(
        self, instance: Instance, reason: DoneReason, *, eviction: bool = False
    ) -> None:
        if instance.state is InstanceState.UNLOADING or instance.gone.is_set():
            await instance.gone.wait()
            return
        if instance.state is InstanceState.LOADING:
            await instance.settled.wait()
        if not instance.is_ready():  # the load failed: it disposed of itself
            return
        instance.transition(InstanceState.UNLOADING)
        if instance.active is not None:
            instance.active.cancel(reason)
        if eviction:
            instance.counters.evictions_total += 1
        self.events.publish("model_evicted", model=instance.model_id, reason=str(reason))
        await self._dispose(instance)

    async def _dispose(self, instance: Instance) -> None:
        """Close the engine on its own thread (after any running loop), free its charge."""
        with anyio.CancelScope(shield=True):
            engine, worker = instance.engine, instance.worker
            if worker is not None:
                if engine is not None:
                    await worker.run(engine.close)
                await worker.shutdown()
            instance.engine = None
            instance.worker = None
            self._budget.release(instance.model_id)
            instance.charge_bytes = 0
            if self._instances.get(instance.model_id) is instance:
                del self._instances[instance.model_id]
            instance.gone.set()
            self._notify_memory_changed()

    @property
    def counters(self) -> Mapping[str, ModelCounters]:
        return self._counters


def _run_loop(
    engine: LlamaEngine, ring: TokenRing, prompt_tokens: list[int], params: object
) -> LoopOutcome:
    """Runs on the worker thread; whatever happens, the consumer sees the stream end."""
    try:
        return engine.generate(ring, prompt_tokens, params)  # type: ignore[arg-type]
    except Exception as exc:
        return LoopOutcome(StopCode.ERROR, len(prompt_tokens), 0, 0.0, 0.0, error=repr(exc))
    finally:
        ring.finish()
