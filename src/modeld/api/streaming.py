"""Streaming a generation to a client, in any protocol's framing: the NDJSON of
``POST /infer`` (chunk lines, then exactly one terminal line), OpenAI's SSE, ...

:class:`GenerationResponse` is an ASGI response of its own so that it, not the framework,
owns the generation: whatever happens (client gone, timeout, eviction, shutdown), the
``finally`` releases it. A :class:`StreamFraming` says what goes on the wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar, runtime_checkable

import anyio
import msgspec
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from modeld.api.context import RequestContext
from modeld.api.logprobs import token_entries
from modeld.errors import ClientDisconnected
from modeld.scheduling.choices import FINISHED_REASONS, ChoiceRun
from modeld.scheduling.generation import Generation
from modeld.types import Chunk, DoneReason, GenerationResult

__all__ = [
    "NDJSON",
    "ChoicesFraming",
    "GenerationResponse",
    "NdjsonFraming",
    "StreamFraming",
    "collect_watched",
    "ndjson_line",
    "one_line_json",
    "start_watched",
    "terminal_record",
    "unless_disconnected",
    "wait_for_disconnect",
]

T = TypeVar("T")
NDJSON = "application/x-ndjson"
# Characters JSON allows raw inside strings but that str.splitlines() (and so httpx's
# iter_lines) takes for line ends: escaped, so a generated U+2028 cannot split a line.
_LINE_BREAKERS = (
    (b"\xe2\x80\xa8", b"\\u2028"),
    (b"\xe2\x80\xa9", b"\\u2029"),
    (b"\xc2\x85", b"\\u0085"),
)


def one_line_json(record: object) -> bytes:
    """JSON in which no character reads as a line end, not even to a reader that splits
    as ``str.splitlines`` does (httpx's ``iter_lines``): for NDJSON lines and SSE data."""
    line = orjson.dumps(record)
    for raw, escaped in _LINE_BREAKERS:
        line = line.replace(raw, escaped)
    return line


def ndjson_line(record: object) -> bytes:
    """One JSON object and its newline."""
    return one_line_json(record) + b"\n"


def terminal_record(result: GenerationResult, *, streamed: bool = False) -> dict[str, object]:
    """``POST /infer``'s record of how a generation ended: with every log-probability
    entry when read whole, none after a stream (its chunk lines carried them)."""
    bare = msgspec.structs.replace(result, logprobs=None)
    record: dict[str, object] = {"done": True, **msgspec.to_builtins(bare)}
    if record.get("error") is None:
        record.pop("error", None)
    if not record.get("tool_calls"):
        record.pop("tool_calls", None)
    record.pop("logprobs", None)
    if result.logprobs is not None and not streamed:
        record["logprobs"] = token_entries(result.logprobs)
    return record


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (the body was already read in full)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def unless_disconnected(
    receive: Receive, work: Callable[[], Awaitable[T]], on_disconnect: Callable[[], None]
) -> tuple[bool, T | None]:
    """Run ``work`` while watching for the client leaving; ``(finished, value)``.

    On disconnect ``on_disconnect`` is called (it should make ``work`` end, e.g. by
    cancelling the generation) and ``work`` is cancelled. Errors of ``work`` propagate
    as they are, never wrapped in an exception group.
    """
    outcome: list[T] = []
    failure: list[BaseException] = []
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            await wait_for_disconnect(receive)
            on_disconnect()
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)
        try:
            outcome.append(await work())
        except Exception as exc:  # re-raised below, outside the task group
            failure.append(exc)
        finally:
            tasks.cancel_scope.cancel()
    if failure:
        raise failure[0]
    return (True, outcome[0]) if outcome else (False, None)


def _noop() -> None:
    pass


async def start_watched(
    receive: Receive, owner: AbstractAsyncContextManager[ChoiceRun]
) -> ChoiceRun:
    """Enter ``owner`` (``ModelManager.choices(...)``) while watching the client: until
    the stream starts nothing reads from it, so a queued or loading request whose client
    is gone leaves the queue at once. Raises :class:`ClientDisconnected` then, and what
    the manager raises."""
    started, run = await unless_disconnected(receive, owner.__aenter__, _noop)
    if not started or run is None:
        raise ClientDisconnected("the client left while its request waited")
    return run


async def collect_watched(
    receive: Receive, owner: AbstractAsyncContextManager[ChoiceRun], run: ChoiceRun
) -> tuple[list[tuple[str, GenerationResult]], GenerationResult]:
    """The whole text and result of every choice of a started run (a client that leaves
    cancels it), then ``owner`` left; and the result the run ended with (the last
    choice's, or :attr:`ChoiceRun.stopped`)."""
    generations: list[Generation] = []
    texts: list[list[str]] = []

    async def collect() -> None:
        async for generation in run:
            generations.append(generation)
            texts.append(parts := [])
            generation.read_whole()
            async for chunk in generation:
                parts.append(chunk.text)

    try:
        await unless_disconnected(receive, collect, run.cancel)
    finally:
        with anyio.CancelScope(shield=True):
            await owner.__aexit__(None, None, None)
    if not generations:  # the client left before the first choice was read
        generations, texts = [run.first], [[]]
    answers = []
    for generation, parts in zip(generations, texts, strict=True):
        assert generation.result is not None
        answers.append(("".join(parts), generation.result))
    return answers, run.stopped or answers[-1][1]


class StreamFraming(Protocol):
    """What a streamed generation looks like on the wire, in one protocol."""

    media_type: str

    def head(self) -> bytes:
        """Sent with the 200, before any token (empty: nothing)."""
        ...

    def chunk(self, chunk: Chunk) -> bytes:
        """One drained batch of text."""
        ...

    def end(self, result: GenerationResult) -> bytes:
        """The end, however the generation ended: every protocol says so its own way."""
        ...


@runtime_checkable
class ChoicesFraming(StreamFraming, Protocol):
    """A framing that carries several choices of one request in one stream (OpenAI's
    ``n``): :meth:`head` and :meth:`chunk` frame the current choice, :meth:`end` ends the
    last one and the stream."""

    def next_choice(self, result: GenerationResult) -> bytes:
        """The end of the current choice, which ran to its end; the next is current."""
        ...


class NdjsonFraming:
    """``POST /infer``: ``{"text","tokens"}`` lines (with ``logprobs`` when asked), then
    the terminal record."""

    media_type = NDJSON

    def head(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        line: dict[str, object] = {"text": chunk.text, "tokens": chunk.tokens}
        if chunk.logprobs:
            line["logprobs"] = token_entries(chunk.logprobs)
        return ndjson_line(line)

    def end(self, result: GenerationResult) -> bytes:
        return ndjson_line(terminal_record(result, streamed=True))


class GenerationResponse(Response):
    """The stream of a started run: each choice's head and chunks (each but the last
    closed by :meth:`ChoicesFraming.next_choice`), then exactly one end, whatever
    happens (a client that leaves cancels the run; an unload between two choices ends
    it with the unload's reason)."""

    def __init__(
        self,
        owner: AbstractAsyncContextManager[ChoiceRun],
        run: ChoiceRun,
        framing: StreamFraming,
        context: RequestContext | None = None,
    ) -> None:
        # Like StreamingResponse: no body attribute, so no Content-Length header.
        self.status_code = 200
        self.background = None
        self.media_type = framing.media_type
        self.init_headers({"Cache-Control": "no-store"})
        assert run.count == 1 or isinstance(framing, ChoicesFraming)
        self._owner = owner
        self._run = run
        self._framing = framing
        self._context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        run = self._run
        try:
            async with anyio.create_task_group() as tasks:

                async def cancel_on_disconnect() -> None:
                    await wait_for_disconnect(receive)
                    run.cancel(DoneReason.CANCELLED)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(cancel_on_disconnect)
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                result = await self._choices(send)
                last = self._framing.end(result)
                await send({"type": "http.response.body", "body": last, "more_body": False})
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._owner.__aexit__(None, None, None)

    async def _choices(self, send: Send) -> GenerationResult:
        """Every choice, each but the last ended at once (its finish goes out before the
        next starts); the result the stream ends with."""
        framing, run = self._framing, self._run
        ended: GenerationResult | None = None
        async for generation in run:
            await _send_body(send, framing.head())
            async for chunk in generation:
                await _send_body(send, framing.chunk(chunk))
            ended = generation.result
            assert ended is not None
            if self._context is not None and run.index == 0:
                self._context.queue_ms = ended.metrics.queue_ms
            if run.index < run.count - 1 and ended.done_reason in FINISHED_REASONS:
                assert isinstance(framing, ChoicesFraming)
                await _send_body(send, framing.next_choice(ended))
        result = run.stopped or ended
        assert result is not None
        return result


async def _send_body(send: Send, body: bytes) -> None:
    if body:
        await send({"type": "http.response.body", "body": body, "more_body": True})
