"""Streaming a generation to a client, in any protocol's framing: the NDJSON of
``POST /infer`` (chunk lines, then exactly one terminal line), OpenAI's SSE, ...

:class:`GenerationResponse` is an ASGI response of its own so that it, not the framework,
owns the generation: whatever happens (client gone, timeout, eviction, shutdown), the
``finally`` releases it. A :class:`StreamFraming` says what goes on the wire.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Protocol, TypeVar

import anyio
import msgspec
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from modeld.api.context import RequestContext
from modeld.errors import ClientDisconnected
from modeld.scheduling.generation import Generation
from modeld.types import Chunk, DoneReason, GenerationResult

__all__ = [
    "NDJSON",
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


def terminal_record(result: GenerationResult) -> dict[str, object]:
    record: dict[str, object] = {"done": True, **msgspec.to_builtins(result)}
    if record.get("error") is None:
        record.pop("error", None)
    if not record.get("tool_calls"):
        record.pop("tool_calls", None)
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
    receive: Receive, owner: AbstractAsyncContextManager[Generation]
) -> Generation:
    """Enter ``owner`` (``ModelManager.stream(...)``) while watching the client: until
    the stream starts nothing reads from it, so a queued or loading request whose client
    is gone leaves the queue at once. Raises :class:`ClientDisconnected` then, and what
    the manager raises."""
    started, generation = await unless_disconnected(receive, owner.__aenter__, _noop)
    if not started or generation is None:
        raise ClientDisconnected("the client left while its request waited")
    return generation


async def collect_watched(
    receive: Receive, owner: AbstractAsyncContextManager[Generation], generation: Generation
) -> str:
    """The whole text of a started generation (a client that leaves cancels it), then
    ``owner`` left; ``generation.result`` is set afterwards."""

    generation.read_whole()

    async def collect() -> str:
        return "".join([chunk.text async for chunk in generation])

    try:
        _, text = await unless_disconnected(receive, collect, generation.cancel)
    finally:
        with anyio.CancelScope(shield=True):
            await owner.__aexit__(None, None, None)
    return text or ""


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


class NdjsonFraming:
    """``POST /infer``: ``{"text","tokens"}`` lines, then the terminal record."""

    media_type = NDJSON

    def head(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        return ndjson_line({"text": chunk.text, "tokens": chunk.tokens})

    def end(self, result: GenerationResult) -> bytes:
        return ndjson_line(terminal_record(result))


class GenerationResponse(Response):
    def __init__(
        self,
        owner: AbstractAsyncContextManager[Generation],
        generation: Generation,
        framing: StreamFraming,
        context: RequestContext | None = None,
    ) -> None:
        # Like StreamingResponse: no body attribute, so no Content-Length header.
        self.status_code = 200
        self.background = None
        self.media_type = framing.media_type
        self.init_headers({"Cache-Control": "no-store"})
        self._owner = owner
        self._generation = generation
        self._framing = framing
        self._context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        generation = self._generation
        try:
            async with anyio.create_task_group() as tasks:

                async def cancel_on_disconnect() -> None:
                    await wait_for_disconnect(receive)
                    generation.cancel(DoneReason.CANCELLED)
                    tasks.cancel_scope.cancel()

                tasks.start_soon(cancel_on_disconnect)
                await send(
                    {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
                )
                head = self._framing.head()
                if head:
                    await send({"type": "http.response.body", "body": head, "more_body": True})
                async for chunk in generation:
                    line = self._framing.chunk(chunk)
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                assert generation.result is not None
                if self._context is not None:
                    self._context.queue_ms = generation.result.metrics.queue_ms
                last = self._framing.end(generation.result)
                await send({"type": "http.response.body", "body": last, "more_body": False})
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._owner.__aexit__(None, None, None)
