"""The NDJSON response of ``POST /infer``: chunk lines, then exactly one terminal line.

It is an ASGI response of its own so that it, not the framework, owns the generation:
whatever happens (client gone, timeout, eviction, shutdown), the ``finally`` releases it.
What each line says is a :class:`LineFormat`: modeld's own, or a compatible protocol's
(Ollama's ``/api/generate`` and ``/api/chat``).
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

from modeld.scheduling.generation import Generation
from modeld.types import Chunk, DoneReason, GenerationResult

__all__ = [
    "NATIVE_LINES",
    "LineFormat",
    "NdjsonGenerationResponse",
    "ndjson_line",
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


def ndjson_line(record: object) -> bytes:
    """One JSON object and its newline; no character inside it reads as a line end."""
    line = orjson.dumps(record)
    for raw, escaped in _LINE_BREAKERS:
        line = line.replace(raw, escaped)
    return line + b"\n"


def terminal_record(result: GenerationResult) -> dict[str, object]:
    record: dict[str, object] = {"done": True, **msgspec.to_builtins(result)}
    if record.get("error") is None:
        record.pop("error", None)
    return record


class LineFormat(Protocol):
    """What a stream's lines say: one per chunk, and the last one."""

    def chunk(self, chunk: Chunk) -> object: ...

    def end(self, result: GenerationResult) -> object: ...


class _NativeLines:
    def chunk(self, chunk: Chunk) -> object:
        return {"text": chunk.text, "tokens": chunk.tokens}

    def end(self, result: GenerationResult) -> object:
        return terminal_record(result)


NATIVE_LINES: LineFormat = _NativeLines()


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


class NdjsonGenerationResponse(Response):
    media_type = NDJSON

    def __init__(
        self,
        owner: AbstractAsyncContextManager[Generation],
        generation: Generation,
        lines: LineFormat = NATIVE_LINES,
    ) -> None:
        # Like StreamingResponse: no body attribute, so no Content-Length header.
        self.status_code = 200
        self.background = None
        self.init_headers({"Cache-Control": "no-store"})
        self._owner = owner
        self._generation = generation
        self._lines = lines

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
                async for chunk in generation:
                    line = ndjson_line(self._lines.chunk(chunk))
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                assert generation.result is not None
                scope.setdefault("state", {})["queue_ms"] = generation.result.metrics.queue_ms
                last = ndjson_line(self._lines.end(generation.result))
                await send({"type": "http.response.body", "body": last, "more_body": False})
                tasks.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._owner.__aexit__(None, None, None)
