"""A request's path from admission to running work: a generation is handed to the
model's worker once (prepared there, then generated), an embedding likewise; and the
bookkeeping when it ends.

The scheduler decides *when*; what a request becomes on the worker is the engine's
(:func:`~modeld.engine.contract.run_request`). Everything here runs on the event loop.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
from loguru import logger

from modeld.engine.base import EngineClosed, LoopOutcome, TokenRing
from modeld.engine.contract import PreparedRequest, Recipe, Request, run_choice, run_request
from modeld.engine.grammar import grammar_for_request
from modeld.engine.worker import ThreadCall, WorkerStopped
from modeld.errors import InvalidRequest, RequestNotFound
from modeld.events import EventHub, GenerationFinished
from modeld.scheduling.admission import Admission
from modeld.scheduling.choices import ChoiceRun, check_choices
from modeld.scheduling.fifo import SlotTicket
from modeld.scheduling.file_check import FileChanged, WorkerFileCheck, replaced_file
from modeld.scheduling.generation import Generation, RequestTiming
from modeld.scheduling.instance import Instance
from modeld.scheduling.pool import InstancePool
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings
from modeld.settings.per_model import ResolvedModel
from modeld.tools.plan import check_tool_request
from modeld.types import (
    MAX_EMBEDDING_INPUTS,
    MAX_PROMPT_CHARS,
    ChatRequest,
    DoneReason,
    EmbeddingInput,
    EmbeddingResult,
)

__all__ = ["Launcher", "embedding_inputs"]

T = TypeVar("T")

Embedded = tuple[list[list[float]], int]  # the vectors and their token count


class Launcher:
    """Runs generations and embeddings; ``generations`` holds the running requests (each
    a :class:`ChoiceRun`) by request id."""

    def __init__(
        self, settings: LiveSettings, pool: InstancePool, events: EventHub, admission: Admission
    ) -> None:
        self._live = settings
        self._pool = pool
        self._events = events
        self._admission = admission
        self.generations: dict[str, ChoiceRun] = {}

    @property
    def settings(self) -> Settings:
        return self._live.current

    @asynccontextmanager
    async def stream(
        self,
        request: Request,
        request_id: str | None,
        resolve: Callable[[str | None], ResolvedModel],
        count: int = 1,
    ) -> AsyncIterator[ChoiceRun]:
        """See ``ModelManager.choices``; ``resolve`` names the model a request asks for.
        The run holds the slot from the first choice to its end."""
        check_choices(count)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.generations:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        grammar = await _grammar_for(request)  # before anything is held
        if isinstance(request, ChatRequest):  # tools: refused before anything is held
            await anyio.to_thread.run_sync(check_tool_request, request)
        model = resolve(request.model)
        recipe = Recipe(grammar, model.chat_template, model.tool_format)
        async with self._admission.admit(model.id) as ticket:
            run = ChoiceRun(
                request_id=request_id,
                model_id=model.id,
                count=count,
                on_end=lambda run: self._run_ended(run, ticket),
            )

            def launch(instance: Instance, timing: RequestTiming) -> Awaitable[Generation | None]:
                return self._generation(instance, request, recipe, run, timing, ticket)

            await self._admission.start(model.id, ticket, launch, launch_checks_file=True)
            try:
                yield run
            finally:
                await run.aclose()

    async def embed(
        self,
        model_id: str,
        texts: list[EmbeddingInput],
        keep_alive: str | float | None,
        truncate: bool = False,
    ) -> EmbeddingResult:
        """See ``ModelManager.embed``."""
        cancelled = threading.Event()
        timings: list[RequestTiming] = []
        async with self._admission.admit(model_id) as ticket:

            def launch(instance: Instance, timing: RequestTiming) -> Awaitable[Any]:
                timings[:] = [timing]
                self._pool.idle.used(instance, keep_alive)
                return _start_embedding(self._pool, instance, texts, cancelled, timing, truncate)

            call: ThreadCall[Embedded] = await self._admission.start(
                model_id, ticket, launch, launch_checks_file=False
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

    def cancel(self, request_id: str, reason: DoneReason = DoneReason.CANCELLED) -> None:
        """Cancel a running generation by id. Raises :class:`RequestNotFound`."""
        run = self.generations.get(request_id)
        if run is None:
            raise RequestNotFound(f"no running request {request_id!r}")
        run.cancel(reason)

    async def drain(self, grace_s: float) -> None:
        """Let running generations finish for ``grace_s``, then cancel the rest (done
        reason ``shutdown``)."""
        with anyio.move_on_after(grace_s):
            while self.generations:
                await self._pool.changes.wait(None)
        for run in list(self.generations.values()):
            run.cancel(DoneReason.SHUTDOWN)

    async def _generation(
        self,
        instance: Instance,
        request: Request,
        recipe: Recipe,
        run: ChoiceRun,
        timing: RequestTiming,
        ticket: SlotTicket,
        check_file: bool = True,
    ) -> Generation | None:
        """Hand the request to the instance's worker, which checks the loaded file
        (:mod:`~modeld.scheduling.file_check`), prepares the request and generates its
        first choice; returns once the token loop has started (None: the instance went
        away, or was unloaded for a changed file). The run takes over ``ticket``.

        "Prepared" wakes no one: the loop wakes the event loop through the ring as it
        starts (the C loop: without the GIL), so neither waits for the other's GIL on
        the way to the first token; a preparation that fails ends the call, which wakes.

        Raises what preparing and the file's lookup raise (:class:`InvalidRequest`, ...).
        Cancelled while preparing, the worker is told to stop and the model stays busy
        (visibly) until it has: the next request does not queue behind it unseen."""
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None:
            return None
        ring = engine.new_ring()
        ring.wake_at_start()
        check = WorkerFileCheck(self._pool.registry, instance.model if check_file else None)
        kept: list[PreparedRequest] = []

        def prepare_and_generate(prepared: Callable[[], None]) -> LoopOutcome:
            check.run()
            return run_request(engine, request, recipe, ring, prepared, kept.append)

        leased = self._pool.threads.leased(instance, engine, prepare_and_generate)
        staged = self._pool.first_use(instance, leased)  # the first one in a stage marker
        call = _given_back(self._pool, instance, worker.submit_signalling(staged, ring.fileno()))
        try:
            prepared = await check.signalled(call)
        except FileChanged:
            ring.close()
            if await replaced_file(self._pool.registry, self._pool.unloader, instance):
                return None  # unloaded: loaded again from the file as it is now
            return await self._generation(  # the same file after all (a race): go on
                instance, request, recipe, run, timing, ticket, check_file=False
            )
        except (WorkerStopped, EngineClosed):
            ring.close()
            return None
        except BaseException:
            ring.cancel()
            call.when_done(ring.close)
            ticket.release_when(call.when_done)
            raise
        if not prepared or not instance.is_ready():  # unloading began meanwhile
            ring.cancel()
            call.when_done(ring.close)
            return None
        (work,) = kept
        if work.tool_format is not None:
            logger.debug("tool calls", model=instance.model_id, tool_format=work.tool_format)
        timeout = self.settings.infer_timeout
        run.deadline_s = timing.admitted_s + timeout if timeout else None
        first = self._running(instance, request, run, ring, call, timing)
        first.parse_tool_calls(work.tool_format)

        async def next_choice(index: int) -> Generation | None:
            return self._next_choice(instance, request, run, work, index)

        run.begin(first, next_choice)
        instance.active = run
        self.generations[run.request_id] = run
        return first

    def _next_choice(
        self,
        instance: Instance,
        request: Request,
        run: ChoiceRun,
        work: PreparedRequest,
        index: int,
    ) -> Generation | None:
        """Choice ``index`` of ``run`` on its held slot, from what the first prepared
        (:func:`run_choice`); None when the instance is going away."""
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None or not instance.is_ready():
            return None
        ring = engine.new_ring()
        choose = self._pool.threads.leased(instance, engine, run_choice)
        call = _given_back(
            self._pool, instance, worker.submit(lambda: choose(engine, work, index, ring))
        )
        generation = self._running(instance, request, run, ring, call, RequestTiming())
        generation.parse_tool_calls(work.tool_format)
        return generation

    def _running(
        self,
        instance: Instance,
        request: Request,
        run: ChoiceRun,
        ring: TokenRing,
        call: ThreadCall[LoopOutcome],
        timing: RequestTiming,
    ) -> Generation:
        instance.generations_started += 1
        timing.started_s = time.monotonic()
        instance.last_used_s = timing.started_s
        self._pool.idle.used(instance, request.keep_alive)
        return Generation(
            request_id=run.request_id,
            model_id=instance.model_id,
            ring=ring,
            call=call,
            timing=timing,
            deadline_s=run.deadline_s,
            on_finished=lambda g: self._finished(instance, run, g, timing),
            logprobs=request.logprobs is not None,
            max_gap_s=self.settings.stream_max_gap_ms / 1000,
        )

    def _finished(
        self, instance: Instance, run: ChoiceRun, generation: Generation, timing: RequestTiming
    ) -> None:
        now_s = time.monotonic()
        self._admission.generation_took(now_s - timing.started_s)
        instance.last_used_s = now_s
        run.choice_ended(generation)  # the last choice (or an early end) ends the run
        self._pool.changes.notify()
        if generation.result is not None:
            if generation.result.metrics.completion_tokens:
                rate = generation.result.metrics.tokens_per_second
                instance.counters.last_tokens_per_second = rate
            self._events.publish(GenerationFinished(result=generation.result))

    def _run_ended(self, run: ChoiceRun, ticket: SlotTicket) -> None:
        """The request's last choice has ended (or it stopped): the slot goes on."""
        instance = self._pool.get(run.model_id)
        if instance is not None and instance.active is run:
            instance.active = None
        if self.generations.get(run.request_id) is run:
            del self.generations[run.request_id]
        ticket.release()
        self._pool.changes.notify()


async def _start_embedding(
    pool: InstancePool,
    instance: Instance,
    texts: list[EmbeddingInput],
    cancelled: threading.Event,
    timing: RequestTiming,
    truncate: bool,
) -> ThreadCall[Embedded] | None:
    """Charge the embedding context (first use) and start the embedding on the
    instance's worker; None when the instance went away meanwhile."""
    try:
        await pool.room.reserve_embedding(instance, timing.deadline_s)
    except EngineClosed:
        return None
    engine, worker = instance.engine, instance.worker
    if engine is None or worker is None or not instance.is_ready():
        return None
    instance.last_used_s = time.monotonic()
    embed = pool.threads.leased(instance, engine, engine.embed)
    call = worker.submit(lambda: embed(texts, cancelled.is_set, truncate=truncate))
    return _given_back(pool, instance, call)


def _given_back(pool: InstancePool, instance: Instance, call: ThreadCall[T]) -> ThreadCall[T]:
    """``call`` (leased work on ``instance``'s worker) gives its threads back when it ends."""
    call.when_done(lambda: pool.threads.give_back(instance))
    return call


async def _grammar_for(request: Request) -> str | None:
    """The grammar enforcing the request's ``format`` (or its own ``grammar``), made
    off the event loop (a schema may be large). Raises :class:`InvalidRequest` naming
    ``format`` or ``grammar``."""
    if request.format is None and request.grammar is None:
        return None
    return await anyio.to_thread.run_sync(grammar_for_request, request.format, request.grammar)


def embedding_inputs(inputs: Sequence[EmbeddingInput]) -> list[EmbeddingInput]:
    """Raises :class:`InvalidRequest` (field ``input``) unless 1 to
    :data:`MAX_EMBEDDING_INPUTS` inputs, each a non-empty string of at most
    :data:`MAX_PROMPT_CHARS` or a non-empty list of at most as many token ids (ints)."""
    if isinstance(inputs, str):
        inputs = [inputs]
    items = list(inputs)
    if not 1 <= len(items) <= MAX_EMBEDDING_INPUTS:
        raise InvalidRequest(
            f"give 1 to {MAX_EMBEDDING_INPUTS} inputs, not {len(items)}", field="input"
        )
    for index, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise InvalidRequest(f"input {index} is not a non-empty string", field="input")
        elif (
            not isinstance(item, Sequence)
            or not item
            or not all(type(token) is int for token in item)
        ):
            raise InvalidRequest(
                f"input {index} is not a non-empty string or list of token ids", field="input"
            )
        if len(item) > MAX_PROMPT_CHARS:
            raise InvalidRequest(
                f"input {index} is over {MAX_PROMPT_CHARS} characters or tokens", field="input"
            )
    return items
