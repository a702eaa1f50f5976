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
from modeld.types import ChatRequest, GenerationResult, InferRequest

__all__ = [
    "ApiFamily",
    "Call",
    "GenerationProtocol",
    "ManyChoices",
    "answer",
    "endpoint",
    "json_response",
]


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
    """A call that asks for several answers to one prompt (OpenAI's ``n``): they run one
    after another on the slot the request holds (``ModelManager.choices``), so the
    prompt's KV cache from the first makes the others' prompt evaluation nearly free
    (prompt reuse). Streamed, its framing is a
    :class:`~modeld.api.streaming.ChoicesFraming`."""

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
    generation runs, then its stream, or its whole answer. A call of several choices
    (:class:`ManyChoices`) runs them one after another on the slot it holds, the prompt
    evaluated once; an early end of any choice is the answer's end (its error)."""
    edge = Edge.of(request)
    call = await protocol.decode(edge, await edge.body())
    if isinstance(call, Response):
        return call
    many = call if isinstance(call, ManyChoices) and call.choices > 1 else None
    generate = call.request
    context = edge.context
    context.model = context.model or generate.model or edge.settings.default_model
    if prompt_logging_enabled():
        logger.debug("prompt", prompt=_prompt_of(generate), model=generate.model)
    owner = edge.choices(generate, many.choices if many is not None else 1)
    run = await start_watched(request.receive, owner)
    first = run.first
    if generate.stream:
        return GenerationResponse(owner, run, call.framing(first), context)
    answers, ended = await collect_watched(request.receive, owner, run)
    context.queue_ms = answers[0][1].metrics.queue_ms
    if prompt_logging_enabled():
        texts = [text for text, _ in answers]
        logger.debug("completion", text=texts if many is not None else texts[0])
    error = early_end_error(ended)
    if error is not None and not protocol.early_end_in_answer:
        return protocol.errors.response(error, context)
    if many is not None:
        return json_response(many.whole_choices(first, answers))
    text, result = answers[0]
    return json_response(call.whole(first, text, result))


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
