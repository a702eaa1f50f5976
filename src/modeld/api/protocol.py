"""A generation protocol is one value; :func:`answer` is the one request path of all.

A :class:`GenerationProtocol` (NDJSON ``/infer``, OpenAI chat, completions and responses,
Ollama generate and chat) decodes its body into a :class:`Call`: the typed request, with
the model's defaults applied, and how to shape its answer (stream framing, or the whole
object). Everything else is :func:`answer`'s, the same for every protocol: start the
generation while watching the client, stream it or collect it, record the queue time,
log the prompt and the answer at debug, and what an early end means
(:data:`~modeld.api.errors.EARLY_END`, answered in the protocol's own error shape).

An :class:`ApiFamily` is a group of routes mounted under one prefix with one error shape
(modeld's own, OpenAI's, Ollama's); :mod:`modeld.api.families` lists them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgspec
import orjson
from loguru import logger
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from modeld.api.edge import Edge
from modeld.api.errors import ErrorShape, early_end_error
from modeld.api.streaming import GenerationResponse, StreamFraming, collect_watched, start_watched
from modeld.observability.logging import prompt_logging_enabled
from modeld.scheduling.generation import Generation
from modeld.types import SEED_MAX, ChatRequest, GenerationResult, InferRequest

__all__ = [
    "MAX_CHOICES",
    "ApiFamily",
    "Call",
    "GenerationProtocol",
    "ManyChoices",
    "answer",
    "endpoint",
    "json_response",
]

MAX_CHOICES = 8
"""The most choices (OpenAI's ``n``) one request may ask for: each is a generation."""


def json_response(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


class Call(Protocol):
    """One decoded generation request, and how its protocol shapes the answer."""

    @property
    def request(self) -> InferRequest | ChatRequest: ...

    def framing(self, generation: Generation) -> StreamFraming:
        """The stream's framing (``generation`` started: its model id is known)."""
        ...

    def whole(self, generation: Generation, text: str, result: GenerationResult) -> object:
        """The unstreamed answer's JSON object (for a generation that ran to its end,
        or any end when the protocol says early ends in its answer)."""
        ...


@runtime_checkable
class ManyChoices(Protocol):
    """A call that asks for several answers to one prompt (OpenAI's ``n``), answered
    whole: they run one after another, so the prompt's KV cache from the first makes the
    others' prompt evaluation nearly free (prompt reuse)."""

    @property
    def choices(self) -> int: ...

    def whole_choices(
        self, generation: Generation, answers: Sequence[tuple[str, GenerationResult]]
    ) -> object:
        """The one object holding every answer, in order."""
        ...


class GenerationProtocol(Protocol):
    """One wire format of generation."""

    @property
    def errors(self) -> ErrorShape:
        """The error body of the family it belongs to."""
        ...

    @property
    def early_end_in_answer(self) -> bool:
        """True when the whole answer itself says how the generation ended (NDJSON's
        terminal record); else an early end is answered as its error."""
        ...

    async def decode(self, edge: Edge, body: bytes) -> Call | Response:
        """The body as a :class:`Call`, or an answer that needs no generation (Ollama's
        empty prompt loads the model). Raises :class:`~modeld.errors.InvalidRequest`
        naming the wire field."""
        ...


def _prompt_of(generate: InferRequest | ChatRequest) -> str:
    return str(generate.messages if isinstance(generate, ChatRequest) else generate.prompt)


async def answer(protocol: GenerationProtocol, request: Request) -> Response:
    """Decode, generate and answer one request in ``protocol``: a 4xx/5xx until the
    generation runs, then its stream, or its whole answer."""
    edge = Edge.of(request)
    call = await protocol.decode(edge, await edge.body())
    if isinstance(call, Response):
        return call
    if isinstance(call, ManyChoices) and call.choices > 1:
        return await _answer_choices(protocol, request, edge, call, call)
    generate = call.request
    context = edge.context
    context.model = context.model or generate.model or edge.settings.default_model
    if prompt_logging_enabled():
        logger.debug("prompt", prompt=_prompt_of(generate), model=generate.model)
    owner = edge.stream(generate)
    generation = await start_watched(request.receive, owner)
    if generate.stream:
        return GenerationResponse(owner, generation, call.framing(generation), context)
    text = await collect_watched(request.receive, owner, generation)
    result = generation.result
    assert result is not None
    context.queue_ms = result.metrics.queue_ms
    if prompt_logging_enabled():
        logger.debug("completion", text=text)
    error = early_end_error(result)
    if error is not None and not protocol.early_end_in_answer:
        return protocol.errors.response(error, context)
    return json_response(call.whole(generation, text, result))


async def _answer_choices(
    protocol: GenerationProtocol, request: Request, edge: Edge, call: Call, many: ManyChoices
) -> Response:
    """``call.choices`` generations of one request, one after another (choice ``i``
    with seed ``seed + i`` when the request has one), answered as one object; an early
    end of any is the answer's error."""
    generate = call.request
    edge.context.model = edge.context.model or generate.model or edge.settings.default_model
    answers: list[tuple[str, GenerationResult]] = []
    first: Generation | None = None
    for index in range(many.choices):
        seed = None if generate.seed is None else (generate.seed + index) % (SEED_MAX + 1)
        owner = edge.stream(msgspec.structs.replace(generate, seed=seed))
        generation = await start_watched(request.receive, owner)
        first = first or generation
        text = await collect_watched(request.receive, owner, generation)
        assert generation.result is not None
        error = early_end_error(generation.result)
        if error is not None:
            return protocol.errors.response(error, edge.context)
        answers.append((text, generation.result))
    edge.context.queue_ms = answers[0][1].metrics.queue_ms
    assert first is not None
    return json_response(many.whole_choices(first, answers))


def endpoint(protocol: GenerationProtocol) -> Callable[[Request], object]:
    """``protocol`` as a Starlette endpoint."""

    async def handle(request: Request) -> Response:
        return await answer(protocol, request)

    return handle


@dataclass(frozen=True)
class ApiFamily:
    """Routes mounted under one prefix, whose errors all take one shape."""

    name: str
    prefix: str  # "" for modeld's own routes at the root
    errors: ErrorShape
    routes: Callable[[], Sequence[BaseRoute]]
