"""``ModelManager``: the scheduler behind every request, usable without HTTP.

Read it top to bottom: admission (global cap, queue depth), the instance (load on demand
inside the budget, evicting LRU idle ones), the FIFO slot, the generation, the release.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup

from modeld.config import Settings
from modeld.engine.base import LoopOutcome, StopCode, TokenLoop, TokenRing
from modeld.engine.gpu import gpu_offload_available
from modeld.engine.llama_engine import LlamaEngine
from modeld.engine.worker import WorkerStopped
from modeld.errors import (
    InferTimeout,
    InvalidRequest,
    NoDefaultModel,
    QueueFull,
    QueueTimeout,
    RequestNotFound,
    ShuttingDown,
    TooManyInflight,
)
from modeld.memory.budget import MemoryBudget
from modeld.memory.probe import MemoryProbe, default_budget_mb, detect_probe
from modeld.registry import ModelFile, Registry
from modeld.scheduling.events import EventHub
from modeld.scheduling.generation import Generation, RequestTiming
from modeld.scheduling.instance import Instance, InstanceStatistics, ModelCounters
from modeld.scheduling.pool import EngineFactory, InstancePool
from modeld.sizes import MIB
from modeld.types import Chunk, DoneReason, GenerationResult, InferRequest

__all__ = ["ManagerStatistics", "ModelManager"]

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
        engine_factory: EngineFactory | None = None,
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
        self._pool = InstancePool(
            settings,
            registry=self.registry,
            events=self.events,
            token_loop=token_loop,
            probe=self._probe,
            budget=self._budget,
            gpu=self._gpu,
            retry_after_s=self._retry_after_s,
            engine_factory=engine_factory,
        )
        self._generations: dict[str, Generation] = {}
        self._admitted = 0
        self._started_s = time.monotonic()
        self._generation_s_ewma = 1.0
        self._task_group: TaskGroup | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._pool.start(self._task_group)
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
        self._pool.accepting = False
        with anyio.move_on_after(grace_s):
            while self._generations:
                await self._pool.wait_changed(None)
        for generation in list(self._generations.values()):
            generation.cancel(DoneReason.SHUTDOWN)
        await self._pool.unload_all(DoneReason.SHUTDOWN)

    @property
    def accepting(self) -> bool:
        return self._pool.accepting

    # ----------------------------------------------------------------- queries

    def models(self) -> list[ModelFile]:
        """Rescan the models dir (files added later are found without a restart)."""
        return self.registry.scan()

    def state_of(self, model_id: str) -> str:
        instance = self._pool.get(model_id)
        return str(instance.state) if instance else "unloaded"

    def is_ready(self, model_id: str | None = None) -> bool:
        if model_id is not None:
            instance = self._pool.get(model_id)
            return instance is not None and instance.is_ready()
        return any(i.is_ready() for i in self._pool.all())

    def stalled_loads(self) -> list[str]:
        """Models whose load has run past ``--load-timeout``: the watchdog's signal."""
        return self._pool.stalled_loads()

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
            accepting=self._pool.accepting,
            instances=tuple(self._pool.statistics(now_s, now_unix)),
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
        if not self._pool.accepting:
            raise ShuttingDown("modeld is shutting down")
        cap = self.settings.max_inflight
        if cap is not None and self._admitted >= cap:
            raise TooManyInflight(
                f"{self._admitted} requests in flight (cap {cap})", self._retry_after_s(cap)
            )
        slot = self._pool.slot_for(model_id)
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
        # (The depth was checked by _admit, with no await since: the state is the same.)
        slot = self._pool.slot_for(model.id)
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
                instance = await self._pool.ready_instance(model, deadline_s)
                timing.load_s += time.monotonic() - load_started_s
                generation = await self._launch(instance, request, request_id, timing)
                if generation is not None:
                    return generation
                # unloaded between the load and the launch: load it again, still first
        except BaseException:
            slot.release()
            raise

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
        self._pool.notify_changed()
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
        instance = await self._pool.load(model_id, pin=pin)
        return instance.statistics(time.monotonic(), time.time())

    async def unload(self, model_id: str) -> None:
        """Unload a model, cancelling its running generation (done_reason ``evicted``).

        Raises :class:`InvalidModelId` for unsafe ids, :class:`ModelNotFound` when it is
        not loaded.
        """
        await self._pool.unload_model(model_id)

    @property
    def counters(self) -> Mapping[str, ModelCounters]:
        return self._pool.counters


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
