"""``ModelManager``: the scheduler behind every request, usable without HTTP.

Read it top to bottom: admission (global cap, queue depth), the instance (load on demand
inside the budget, evicting LRU idle ones), the FIFO slot, the generation, the release.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from modeld.config import Settings
from modeld.engine.base import EngineClosed, TokenLoop
from modeld.engine.gpu import gpu_offload_available
from modeld.engine.grammar import grammar_for_format
from modeld.engine.worker import ThreadCall, WorkerStopped
from modeld.errors import (
    InferTimeout,
    InvalidRequest,
    ModeldError,
    NoDefaultModel,
    QueueFull,
    QueueTimeout,
    RequestNotFound,
    ShuttingDown,
    TooManyInflight,
)
from modeld.live_settings import LiveSettings
from modeld.memory.budget import MemoryBudget
from modeld.memory.probe import MemoryProbe, default_budget_mb, detect_probe
from modeld.prompt_cache import CacheStatistics
from modeld.prompt_cache.setup import build_prompt_cache
from modeld.registry import ModelFile, Registry, check_model_id
from modeld.scheduling.clock import Clock
from modeld.scheduling.events import EventHub, GenerationFinished
from modeld.scheduling.fifo import SlotTicket
from modeld.scheduling.file_guard import GuardStatistics
from modeld.scheduling.generation import Generation, RequestTiming
from modeld.scheduling.history import EventHistory, RecentEvent
from modeld.scheduling.instance import Instance, InstanceStatistics, ModelCounters
from modeld.scheduling.model_checks import check_model_settings
from modeld.scheduling.pool import EngineFactory, InstancePool
from modeld.sizes import MIB
from modeld.types import (
    MAX_EMBEDDING_INPUTS,
    MAX_PROMPT_CHARS,
    ChatRequest,
    Chunk,
    DoneReason,
    EmbeddingResult,
    GenerationResult,
    InferRequest,
    ResponseFormat,
)

__all__ = ["CLOSE_TIMEOUT_S", "CounterStatistics", "ManagerStatistics", "ModelManager"]

T = TypeVar("T")
Request = InferRequest | ChatRequest
Launch = Callable[[Instance, RequestTiming], Awaitable[T | None]]

CLOSE_TIMEOUT_S = 5.0  # at shutdown, after the grace: how long instances get to close


@dataclass(frozen=True, slots=True)
class CounterStatistics:
    """A model's totals, kept after its instance is gone."""

    model_id: str
    loads_total: int
    load_failures_total: int
    evictions_total: int


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
    running: int
    accepting: bool
    instances: tuple[InstanceStatistics, ...]
    counters: tuple[CounterStatistics, ...]
    crash_containment: GuardStatistics
    recent_events: tuple[RecentEvent, ...] = ()
    prompt_cache: CacheStatistics | None = None


class ModelManager:
    """Owns the registry, the budget, every instance and every running generation.

    Use as an async context manager (asyncio or trio)::

        async with ModelManager(settings) as manager:
            async with manager.stream(InferRequest(prompt="Hi", model="m.gguf")) as gen:
                async for chunk in gen:
                    print(chunk.text, end="")
            print(gen.result)

    Entering checks the per-model settings (each ``[models."<id>"]`` names a file in the
    models dir, its chat template exists) and starts loading the pinned models.
    """

    def __init__(
        self,
        settings: Settings | LiveSettings,
        *,
        token_loop: TokenLoop | None = None,
        probe: MemoryProbe | None = None,
        events: EventHub | None = None,
        engine_factory: EngineFactory | None = None,
        registry: Registry | None = None,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> None:
        # One holder of the settings in force, read per request (a reload swaps it).
        self.live_settings = live = (
            settings if isinstance(settings, LiveSettings) else LiveSettings(settings)
        )
        settings = live.current
        self.registry = registry or Registry(settings.models_path)
        self.events = events or EventHub()
        self._history = EventHistory()
        self.events.add_listener(self._history)
        self._gpu = settings.n_gpu_layers != 0 and gpu_offload_available()
        if token_loop is None:
            from modeld.engine.select import token_loop as select_token_loop

            token_loop = select_token_loop(settings.token_loop)
        self._loop = token_loop
        self._probe = probe or detect_probe(prefer_gpu=self._gpu)
        budget_mb = settings.vram_budget_mb or default_budget_mb(self._gpu)
        self._budget = MemoryBudget(budget_mb, min(settings.vram_margin_mb, budget_mb))
        self.prompt_cache = build_prompt_cache(settings, self._budget, gpu=self._gpu)
        self._pool = InstancePool(
            live,
            registry=self.registry,
            events=self.events,
            token_loop=token_loop,
            probe=self._probe,
            budget=self._budget,
            gpu=self._gpu,
            retry_after_s=self._retry_after_s,
            engine_factory=engine_factory,
            clock=clock,
            prompt_cache=self.prompt_cache,
        )
        self._generations: dict[str, Generation] = {}
        self._admitted = 0
        self._started_s = time.monotonic()
        self._generation_s_ewma = 1.0
        self._close_timeout_s = close_timeout_s
        self._task_group: TaskGroup | None = None

    # ----------------------------------------------------------------- lifecycle

    async def __aenter__(self) -> Self:
        """Raises :class:`ConfigError` naming a bad ``[models."<id>"]`` table."""
        if self.settings.models:
            known = {model.id for model in await self.registry.rescan()}
            await anyio.to_thread.run_sync(check_model_settings, self.settings, known)
        await self._pool.guard.recover()  # crashes of an earlier process, before any load
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._pool.start(self._task_group)
        for model_id, own in self.settings.models.items():
            if own.pin:
                self._task_group.start_soon(self._load_pinned, model_id)
        return self

    async def _load_pinned(self, model_id: str) -> None:
        """A pinned model loads at start; a failure is logged (and shown in /status)."""
        try:
            await self._pool.load(model_id, pin=True)
        except ModeldError as exc:
            logger.warning("pinned model did not load", model=model_id, error=exc.message)

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

    async def shutdown(self, grace_s: float) -> list[str]:
        """Stop admitting, let running streams finish for ``grace_s``, then cancel them
        (done_reason ``shutdown``), close every instance and end event subscriptions.

        Returns within ``grace_s`` plus ``close_timeout_s``: an instance whose worker does
        not stop by then (hung inside llama.cpp) is abandoned, logged and returned by id.
        Idempotent.
        """
        self._pool.accepting = False
        with anyio.move_on_after(grace_s):
            while self._generations:
                await self._pool.wait_changed(None)
        for generation in list(self._generations.values()):
            generation.cancel(DoneReason.SHUTDOWN)
        abandoned = await self._pool.unload_all(DoneReason.SHUTDOWN, self._close_timeout_s)
        self.events.close()
        return abandoned

    @property
    def settings(self) -> Settings:
        """The settings in force now (a config reload may replace them)."""
        return self.live_settings.current

    @property
    def accepting(self) -> bool:
        return self._pool.accepting

    # ----------------------------------------------------------------- queries

    async def models(self) -> list[ModelFile]:
        """Rescan the models dir (files added later are found without a restart).

        Raises :class:`ModelsDirUnavailable` when the directory does not answer in time.
        """
        return await self.registry.rescan()

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
            running=len(self._generations),
            accepting=self._pool.accepting,
            instances=tuple(self._pool.statistics(now_s, now_unix)),
            counters=tuple(
                CounterStatistics(
                    model_id=model_id,
                    loads_total=counts.loads_total,
                    load_failures_total=counts.load_failures_total,
                    evictions_total=counts.evictions_total,
                )
                for model_id, counts in sorted(self._pool.counters.items())
            ),
            crash_containment=self._pool.guard.statistics(),
            recent_events=self._history.statistics(),
            prompt_cache=self.prompt_cache.statistics(),
        )

    # ----------------------------------------------------------------- generation

    @asynccontextmanager
    async def stream(
        self, request: Request, *, request_id: str | None = None
    ) -> AsyncIterator[Generation]:
        """Admit, load, queue and start one generation; yields it once the loop runs.

        Raises before yielding: :class:`InvalidRequest` (and, for chat,
        :class:`NoChatTemplate`, :class:`ChatTemplateError`), :class:`ModelNotFound`,
        :class:`NoDefaultModel`, :class:`ModelInvalid`, :class:`ModelTooLarge`,
        :class:`ModelLoadFailed`, the :class:`Overloaded` family (429/503),
        :class:`ShuttingDown`, :class:`ResourcesExhausted`, :class:`ModelsDirUnavailable`.
        A ``format`` that cannot be enforced is refused before the request queues.
        Leaving the block early cancels the generation. Cancelled at any await, it leaves
        nothing behind: no admission, no place in the queue, no held slot.
        """
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._generations:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        grammar = await _grammar_for(request.format)  # before anything is held
        model_id = self.model_id(request.model)
        ticket = self._admit(model_id)  # a place in the model's line, owned from here
        try:

            def launch(instance: Instance, timing: RequestTiming) -> Awaitable[Generation | None]:
                return self._launch(instance, request, grammar, request_id, timing, ticket)

            generation = await self._start(model_id, ticket, launch)
            try:
                yield generation
            finally:
                await generation.aclose()
        finally:
            ticket.release()  # a no-op unless nothing took it over (idempotent)
            self._admitted -= 1
            self._pool.forget_slot_if_unused(model_id)

    def stream_chat(
        self, request: ChatRequest, *, request_id: str | None = None
    ) -> AbstractAsyncContextManager[Generation]:
        """:meth:`stream` for a conversation: ``request.messages`` go through the model's
        chat template (its own, or the one configured for it)."""
        return self.stream(request, request_id=request_id)

    async def generate(
        self, request: Request, *, request_id: str | None = None
    ) -> AsyncIterator[Chunk | GenerationResult]:
        """Chunks as they come, then the one :class:`GenerationResult`."""
        async with self.stream(request, request_id=request_id) as generation:
            async for chunk in generation:
                yield chunk
        assert generation.result is not None
        yield generation.result

    async def complete(
        self, request: Request, *, request_id: str | None = None
    ) -> tuple[str, GenerationResult]:
        """The whole text and the result, for callers that do not stream."""
        parts: list[str] = []
        async with self.stream(request, request_id=request_id) as generation:
            async for chunk in generation:
                parts.append(chunk.text)
        assert generation.result is not None
        return "".join(parts), generation.result

    async def chat(
        self, request: ChatRequest, *, request_id: str | None = None
    ) -> tuple[str, GenerationResult]:
        """The assistant's whole answer to ``request.messages`` and the result."""
        return await self.complete(request, request_id=request_id)

    async def embed(
        self,
        model: str | None,
        inputs: Sequence[str],
        *,
        request_id: str | None = None,
        keep_alive: str | float | None = None,
    ) -> EmbeddingResult:
        """L2-normalised embeddings of ``inputs``, in order, computed in a second context
        on the model's loaded weights (its memory charged to the budget on first use).

        Queued in the model's line like a generation. Raises :class:`InvalidRequest`
        (field ``input``: no input, too many, an empty or too long one), and what
        :meth:`stream` raises before yielding. Cancelled, it stops between inputs.
        ``keep_alive`` is how long the model stays loaded afterwards, as for a generation.
        """
        texts = _embedding_inputs(inputs)
        model_id = self.model_id(model)
        ticket = self._admit(model_id)
        cancelled = threading.Event()
        timings: list[RequestTiming] = []
        try:

            def launch(instance: Instance, timing: RequestTiming) -> Awaitable[Any]:
                timings[:] = [timing]
                self._pool.idle.used(instance, keep_alive)
                return self._launch_embedding(instance, texts, cancelled, timing)

            call: ThreadCall[tuple[list[list[float]], int]] = await self._start(
                model_id, ticket, launch
            )
            try:
                vectors, prompt_tokens = await call.wait()
            except BaseException:
                cancelled.set()
                ticket.release_when(call.when_done)  # the model is busy until it stops
                raise
            (timing,) = timings
            return EmbeddingResult(
                model=model_id,
                embeddings=vectors,
                prompt_tokens=prompt_tokens,
                load_ms=timing.load_s * 1000,
                total_ms=(time.monotonic() - timing.admitted_s) * 1000,
            )
        finally:
            ticket.release()
            self._admitted -= 1
            self._pool.forget_slot_if_unused(model_id)

    def cancel_request(self, request_id: str) -> None:
        """Cancel a running generation by id. Raises :class:`RequestNotFound`."""
        generation = self._generations.get(request_id)
        if generation is None:
            raise RequestNotFound(f"no running request {request_id!r}")
        generation.cancel(DoneReason.CANCELLED)

    def model_id(self, name: str | None) -> str:
        """The model id a request's ``model`` names: the default model when None, an
        alias resolved. Raises :class:`NoDefaultModel`, :class:`InvalidModelId`."""
        name = name or self.settings.default_model
        if not name:
            raise NoDefaultModel("no model given and no --default-model configured")
        return check_model_id(self.settings.resolve_model_name(name))

    def sampling_defaults(self, name: str | None) -> Mapping[str, object]:
        """The configured defaults of :class:`SamplingParams` fields for the model a
        request names (an alias, or None for the default model), for whoever builds a
        request from what a client sent: they fill the fields it did not set. Empty for
        a model without a table; never raises (the request's own checks come later)."""
        name = name or self.settings.default_model
        if not name:
            return {}
        return self.settings.model(self.settings.resolve_model_name(name)).defaults

    def _admit(self, model_id: str) -> SlotTicket:
        """Refuse at once past a cap; otherwise join the model's line (no await)."""
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
        return slot.join()

    def _retry_after_s(self, ahead: int) -> float:
        """Requests ahead times the recent mean generation time, at least a second."""
        return float(max(1, math.ceil(ahead * self._generation_s_ewma)))

    async def _start(self, model_id: str, ticket: SlotTicket, launch: Launch[T]) -> T:
        """Wait for the ticket's turn and a ready instance, then ``launch`` on it (None:
        the instance went away meanwhile; it is loaded again, still first in line)."""
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
                        model_id, ticket, timing, inner_deadline_s, launch
                    )
            except TimeoutError:
                raise InferTimeout(
                    f"{model_id}: not started within --infer-timeout ({timeout:g} s)"
                ) from None
        return await self._start_within(model_id, ticket, timing, deadline_s, launch)

    async def _start_within(
        self,
        model_id: str,
        ticket: SlotTicket,
        timing: RequestTiming,
        deadline_s: float,
        launch: Launch[T],
    ) -> T:
        # The ticket keeps the request's place in the model's line from admission on,
        # across the file lookup and the load: the order of arrival is the order of
        # service, whatever happens to the instance meanwhile.
        try:
            model = await self.registry.lookup(model_id)  # an unknown model: 404 at once
            try:
                await ticket.wait(max(0.0, deadline_s - time.monotonic()))
            except TimeoutError:
                queue_len = self._pool.slot_for(model_id).queue_len
                raise QueueTimeout(
                    f"{model_id}: waited {self.settings.max_wait_ms} ms in the queue",
                    self._retry_after_s(queue_len + 1),
                ) from None
            while True:
                load_started_s = time.monotonic()
                instance = await self._pool.ready_instance(model, deadline_s)
                timing.load_s += time.monotonic() - load_started_s
                timing.deadline_s = deadline_s
                launched = await launch(instance, timing)
                if launched is not None:
                    return launched
                # unloaded between the load and the launch: load it again, still first
        except BaseException:
            ticket.release()
            raise

    async def _launch(
        self,
        instance: Instance,
        request: Request,
        grammar: str | None,
        request_id: str,
        timing: RequestTiming,
        ticket: SlotTicket,
    ) -> Generation | None:
        """Prepare the prompt and start the loop on the instance's worker; None when the
        instance went away meanwhile. The generation takes over ``ticket``."""
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None:
            return None
        chat_template = self.settings.model(instance.model_id).chat_template

        def prepare_on_worker() -> list[int]:
            if isinstance(request, ChatRequest):
                tokens = engine.prepare_chat(request.messages, request.max_tokens, chat_template)
            else:
                tokens = engine.prepare(request.prompt, request.max_tokens)
            if grammar is not None:
                engine.check_grammar(grammar)  # refused here, before any byte is sent
            return tokens

        first_use = self._pool.first_use  # the first generation runs in a stage marker
        prepare = worker.submit(first_use(instance, prepare_on_worker))
        try:
            prompt_tokens = await prepare.wait()
        except (WorkerStopped, EngineClosed):
            return None
        except BaseException:
            # The worker may still be tokenizing: the model stays busy (and visibly so)
            # until it is done, and the next request does not queue behind it unseen.
            ticket.release_when(prepare.when_done)
            raise
        if not instance.is_ready():
            return None
        ring = engine.new_ring()
        call = worker.submit(
            first_use(instance, lambda: engine.generate(ring, prompt_tokens, request, grammar))
        )
        instance.generations_started += 1
        timing.started_s = time.monotonic()
        instance.last_used_s = timing.started_s
        self._pool.idle.used(instance, request.keep_alive)
        timeout = self.settings.infer_timeout
        generation = Generation(
            request_id=request_id,
            model_id=instance.model_id,
            ring=ring,
            call=call,
            timing=timing,
            deadline_s=timing.admitted_s + timeout if timeout else None,
            on_finished=lambda g: self._finished(instance, g, timing, ticket),
        )
        instance.active = generation
        self._generations[request_id] = generation
        return generation

    async def _launch_embedding(
        self,
        instance: Instance,
        texts: list[str],
        cancelled: threading.Event,
        timing: RequestTiming,
    ) -> ThreadCall[tuple[list[list[float]], int]] | None:
        """Charge the embedding context (first use) and start the embedding on the
        instance's worker; None when the instance went away meanwhile."""
        try:
            await self._pool.reserve_embedding(instance, timing.deadline_s)
        except EngineClosed:
            return None
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None or not instance.is_ready():
            return None
        instance.last_used_s = time.monotonic()
        return worker.submit(lambda: engine.embed(texts, cancelled.is_set))

    def _finished(
        self, instance: Instance, generation: Generation, timing: RequestTiming, ticket: SlotTicket
    ) -> None:
        now_s = time.monotonic()
        self._generation_s_ewma = 0.8 * self._generation_s_ewma + 0.2 * (now_s - timing.started_s)
        instance.last_used_s = now_s
        if instance.active is generation:
            instance.active = None
        self._generations.pop(generation.request_id, None)
        ticket.release()
        self._pool.notify_changed()
        if generation.result is not None:
            if generation.result.metrics.completion_tokens:
                rate = generation.result.metrics.tokens_per_second
                instance.counters.last_tokens_per_second = rate
            self.events.publish(GenerationFinished(result=generation.result))

    # ----------------------------------------------------------------- instances

    async def load(
        self, model_id: str, *, pin: bool | None = None, keep_alive: str | float | None = None
    ) -> InstanceStatistics:
        """Load (and warm) a model now, or refresh the keep-alive of a loaded one;
        optionally pin it against eviction and idle unload, or set its keep-alive
        (``"5m"``, seconds, ``-1`` for never; the default is ``--keep-alive``)."""
        instance = await self._pool.load(model_id, pin=pin, keep_alive=keep_alive)
        return self._pool.snapshot(instance)

    async def expire(self, model_id: str) -> None:
        """Unload a model as soon as it is idle (now, if it is): its keep-alive becomes
        0. Unlike :meth:`unload` nothing running or queued is cancelled, and a pinned
        model stays. Raises :class:`InvalidModelId` for unsafe ids; a model that is not
        loaded is left as it is."""
        await self._pool.idle.expire(model_id)

    async def unload(self, model_id: str) -> None:
        """Unload a model, cancelling its running generation (done_reason ``evicted``).

        Raises :class:`InvalidModelId` for unsafe ids, :class:`ModelNotFound` when it is
        not loaded.
        """
        await self._pool.unload_model(model_id)

    @property
    def counters(self) -> Mapping[str, ModelCounters]:
        return self._pool.counters


async def _grammar_for(response_format: ResponseFormat | None) -> str | None:
    """The grammar enforcing ``response_format``, converted off the event loop (a schema
    may be large). Raises :class:`InvalidRequest` naming ``format``."""
    if response_format is None:
        return None
    return await anyio.to_thread.run_sync(grammar_for_format, response_format)


def _embedding_inputs(inputs: Sequence[str]) -> list[str]:
    """Raises :class:`InvalidRequest` (field ``input``) unless 1 to
    :data:`MAX_EMBEDDING_INPUTS` non-empty strings of at most :data:`MAX_PROMPT_CHARS`."""
    if isinstance(inputs, str):
        inputs = [inputs]
    texts = list(inputs)
    if not 1 <= len(texts) <= MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"give 1 to {MAX_EMBEDDING_INPUTS} inputs, not {len(texts)}", field="input"
        )
    for index, text in enumerate(texts):
        if not isinstance(text, str) or not text:
            raise InvalidRequest(f"input {index} is not a non-empty string", field="input")
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"input {index} is over {MAX_PROMPT_CHARS} characters", field="input"
            )
    return texts
