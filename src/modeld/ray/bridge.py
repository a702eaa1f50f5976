"""One HTTP exchange carried over a Ray call: the request as a value, the response as parts.

A replica runs modeld's own ASGI app in-process. The ingress sends a
:class:`ForwardedRequest`; the replica answers with a :class:`ResponseStart` and then
``bytes`` pieces, produced by :func:`exchange`. Nothing here imports Ray: it is plain
asyncio, and the seam where a client leaving (the caller closing the iterator) becomes
the ``http.disconnect`` that modeld's routes already act on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

__all__ = [
    "ASGIApp",
    "ForwardedRequest",
    "Lifespan",
    "Message",
    "Receive",
    "ResponseStart",
    "Send",
    "exchange",
]

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]
# How many ASGI messages may wait for the caller before the app's ``send`` blocks: the
# app then slows down (modeld's ring fills, its token loop waits) instead of buffering.
_PENDING_MESSAGES = 64
# After the caller leaves, how long the app gets to see the disconnect and finish (a
# cancelled generation ends within one token).
_FINISH_AFTER_DISCONNECT_S = 10.0


@dataclass(frozen=True, slots=True)
class ForwardedRequest:
    """What the ingress read from its client, complete (the body is read in full)."""

    method: str
    path: str
    query_string: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = ()
    body: bytes = b""
    client: tuple[str, int] | None = None
    http_version: str = "1.1"
    scheme: str = "http"

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode("utf-8", "surrogateescape"),
            "query_string": self.query_string,
            "root_path": "",
            "headers": list(self.headers),
            "client": self.client,
            "server": ("127.0.0.1", 0),
            "state": {},
        }


@dataclass(frozen=True, slots=True)
class ResponseStart:
    status: int
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None


class _Channel:
    """Bounded hand-over from the app's ``send`` to the caller (``None`` marks the end).

    After the caller has gone, ``send`` drops messages rather than block the app forever.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message | None] = asyncio.Queue(_PENDING_MESSAGES)
        self.gone = asyncio.Event()

    async def send(self, message: Message | None) -> None:
        if self.gone.is_set():
            return
        put = asyncio.ensure_future(self.queue.put(message))
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait({put, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            put.cancel()

    def take_body(self, first: Message) -> tuple[bytes, bool]:
        """``first`` joined with the body messages already waiting behind it."""
        parts = [bytes(first.get("body", b""))]
        more = bool(first.get("more_body", False))
        while more and not self.queue.empty():
            following = self.queue.get_nowait()
            if following is None or following["type"] != "http.response.body":
                self.queue.put_nowait(following)  # room: one was just taken
                break
            parts.append(bytes(following.get("body", b"")))
            more = bool(following.get("more_body", False))
        return b"".join(parts), more


async def exchange(
    app: ASGIApp, request: ForwardedRequest, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> AsyncIterator[ResponseStart | bytes]:
    """Run ``app`` on ``request``: yields one :class:`ResponseStart`, then body pieces.

    Pieces that are ready together are joined, so a fast stream costs fewer hand-overs.
    Closing or cancelling the iterator is the client leaving: the app's ``receive``
    returns ``http.disconnect`` and the app gets a bounded time to finish (modeld cancels
    the generation). An app that ends without starting a response yields a bare 500.
    """
    channel = _Channel()
    delivered = False

    async def receive() -> Message:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await channel.gone.wait()
        return {"type": "http.disconnect"}

    async def run() -> None:
        try:
            await app(request.scope(), receive, channel.send)
        finally:
            await channel.send(None)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while (message := await channel.queue.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                headers = tuple((bytes(k), bytes(v)) for k, v in message.get("headers", ()))
                yield ResponseStart(int(message["status"]), headers + extra_headers)
            elif message["type"] == "http.response.body":
                body, more = channel.take_body(message)
                if body:
                    yield body
                if not more:
                    break
        if not started:
            yield ResponseStart(500, ((b"content-type", b"application/json"), *extra_headers))
            yield _NO_RESPONSE
    finally:
        channel.gone.set()
        await asyncio.shield(_finish(task))


_NO_RESPONSE = b'{"error": {"code": "internal_error", "message": "the app sent no response"}}'


async def _finish(task: asyncio.Future[None]) -> None:
    """Let the app see the disconnect and end; cancel it only if it does not."""
    if not task.done():
        await asyncio.wait({task}, timeout=_FINISH_AFTER_DISCONNECT_S)
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled() and (failure := task.exception()) is not None:
        logger.opt(exception=failure).error("app failed while answering a forwarded request")


class Lifespan:
    """Drives an ASGI app's lifespan (modeld enters its ``ModelManager`` there) in a task
    of its own, so startup and shutdown may be awaited from different tasks."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app
        self._started: asyncio.Future[None] | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._shutdown = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def startup(self) -> None:
        """Raises ``RuntimeError`` with the app's message when startup fails."""
        loop = asyncio.get_running_loop()
        self._started, self._stopped = loop.create_future(), loop.create_future()
        self._task = asyncio.ensure_future(self._run())
        await self._started

    async def shutdown(self) -> None:
        if self._task is None or self._stopped is None:
            return
        self._shutdown.set()
        await asyncio.wait({self._task})
        if self._stopped.done():
            self._stopped.result()

    async def _run(self) -> None:
        assert self._started is not None
        assert self._stopped is not None
        started, stopped = self._started, self._stopped
        phase = iter(["lifespan.startup"])

        async def receive() -> Message:
            kind = next(phase, None)
            if kind is not None:
                return {"type": kind}
            await self._shutdown.wait()
            return {"type": "lifespan.shutdown"}

        async def send(message: Message) -> None:
            kind = message["type"]
            if kind == "lifespan.startup.complete":
                started.set_result(None)
            elif kind == "lifespan.startup.failed":
                started.set_exception(RuntimeError(message.get("message") or "startup failed"))
            elif kind == "lifespan.shutdown.complete":
                stopped.set_result(None)
            elif kind == "lifespan.shutdown.failed":
                stopped.set_exception(RuntimeError(message.get("message") or "shutdown failed"))

        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        try:
            await self._app(scope, receive, send)
        except BaseException as exc:
            for future in (started, stopped):
                if not future.done():
                    future.set_exception(RuntimeError(f"lifespan ended: {exc!r}"))
            raise
        for future in (started, stopped):
            if not future.done():
                future.set_exception(RuntimeError("lifespan ended without completing"))
