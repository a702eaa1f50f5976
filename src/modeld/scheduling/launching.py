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
from typing import Any

import anyio
from loguru import logger

from modeld.engine.base import EngineClosed, LoopOutcome, TokenRing
from modeld.engine.contract import PreparedRequest, Recipe, Request, run_request
from modeld.engine.grammar import grammar_for_request
from modeld.engine.worker import ThreadCall, WorkerStopped
from modeld.errors import InvalidRequest, RequestNotFound
from modeld.events import EventHub, GenerationFinished
from modeld.scheduling.admission import Admission
from modeld.scheduling.fifo import SlotTicket
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

Embedded = tuple[list[list[float]], int]  # the vectors and their token count


class Launcher:
    """Runs generations and embeddings; ``generations`` holds the running ones by
    request id."""

    def __init__(
        self, settings: LiveSettings, pool: InstancePool, events: EventHub, admission: Admission
    ) -> None:
        self._live = settings
        self._pool = pool
        self._events = events
        self._admission = admission
        self.generations: dict[str, Generation] = {}

    @property
    def settings(self) -> Settings:
        return self._live.current

    @asynccontextmanager
    async def stream(
        self,
        request: Request,
        request_id: str | None,
        resolve: Callable[[str | None], ResolvedModel],
    ) -> AsyncIterator[Generation]:
        """See ``ModelManager.stream``; ``resolve`` names the model a request asks for."""
        request_id = request_id or uuid.uuid4().hex
        if request_id in self.generations:
            raise InvalidRequest(f"request id {request_id!r} is already running")
        grammar = await _grammar_for(request)  # before anything is held
        if isinstance(request, ChatRequest):  # tools: refused before anything is held
            await anyio.to_thread.run_sync(check_tool_request, request)
        model = resolve(request.model)
        recipe = Recipe(grammar, model.chat_template, model.tool_format)
        model_id = model.id
        async with self._admission.admit(model_id) as ticket:

            def launch(instance: Instance, timing: RequestTiming) -> Awaitable[Generation | None]:
                return self._generation(instance, request, recipe, request_id, timing, ticket)

            generation = await self._admission.start(model_id, ticket, launch)
            try:
                yield generation
            finally:
                await generation.aclose()

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
                return self._embedding(instance, texts, cancelled, timing, truncate)

            call: ThreadCall[Embedded] = await self._admission.start(model_id, ticket, launch)
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
        generation = self.generations.get(request_id)
        if generation is None:
            raise RequestNotFound(f"no running request {request_id!r}")
        generation.cancel(reason)

    async def drain(self, grace_s: float) -> None:
        """Let running generations finish for ``grace_s``, then cancel the rest (done
        reason ``shutdown``)."""
        with anyio.move_on_after(grace_s):
            while self.generations:
                await self._pool.changes.wait(None)
        for generation in list(self.generations.values()):
            generation.cancel(DoneReason.SHUTDOWN)

    async def _generation(
        self,
        instance: Instance,
        request: Request,
        recipe: Recipe,
        request_id: str,
        timing: RequestTiming,
        ticket: SlotTicket,
    ) -> Generation | None:
        """Hand the request to the instance's worker, which prepares it and goes on to
        generate; returns once it is prepared (None when the instance went away
        meanwhile). The generation takes over ``ticket``.

        Raises what preparing raises (:class:`InvalidRequest`, ...). Cancelled while the
        request is prepared, the worker is told to stop and the model stays busy (and
        visibly so) until it has: the next request does not queue behind it unseen.
        """
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None:
            return None
        ring = engine.new_ring()

        kept: list[PreparedRequest] = []

        def prepare_and_generate(prepared: Callable[[], None]) -> LoopOutcome:
            return run_request(engine, request, recipe, ring, prepared, kept.append)

        # the first generation runs in a stage marker
        call = worker.submit_signalling(self._pool.first_use(instance, prepare_and_generate))
        try:
            prepared = await call.signalled()
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
        tool_format = kept[0].tool_format if kept else None
        if tool_format is not None:
            logger.debug("tool calls", model=instance.model_id, tool_format=tool_format)
        generation = self._running(instance, request, request_id, ring, call, timing, ticket)
        generation.parse_tool_calls(tool_format)
        return generation

    def _running(
        self,
        instance: Instance,
        request: Request,
        request_id: str,
        ring: TokenRing,
        call: ThreadCall[LoopOutcome],
        timing: RequestTiming,
        ticket: SlotTicket,
    ) -> Generation:
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
            max_gap_s=self.settings.stream_max_gap_ms / 1000,
        )
        instance.active = generation
        self.generations[request_id] = generation
        return generation

    async def _embedding(
        self,
        instance: Instance,
        texts: list[EmbeddingInput],
        cancelled: threading.Event,
        timing: RequestTiming,
        truncate: bool,
    ) -> ThreadCall[Embedded] | None:
        """Charge the embedding context (first use) and start the embedding on the
        instance's worker; None when the instance went away meanwhile."""
        try:
            await self._pool.room.reserve_embedding(instance, timing.deadline_s)
        except EngineClosed:
            return None
        engine, worker = instance.engine, instance.worker
        if engine is None or worker is None or not instance.is_ready():
            return None
        instance.last_used_s = time.monotonic()
        return worker.submit(lambda: engine.embed(texts, cancelled.is_set, truncate=truncate))

    def _finished(
        self, instance: Instance, generation: Generation, timing: RequestTiming, ticket: SlotTicket
    ) -> None:
        now_s = time.monotonic()
        self._admission.generation_took(now_s - timing.started_s)
        instance.last_used_s = now_s
        if instance.active is generation:
            instance.active = None
        self.generations.pop(generation.request_id, None)
        ticket.release()
        self._pool.changes.notify()
        if generation.result is not None:
            if generation.result.metrics.completion_tokens:
                rate = generation.result.metrics.tokens_per_second
                instance.counters.last_tokens_per_second = rate
            self._events.publish(GenerationFinished(result=generation.result))


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
