"""The ingress deployment: one HTTP endpoint for every replica, routed by the body's model.

Each request is read whole (bounded like modeld's own routes), its model id taken from
the JSON body's ``model`` field or from the path (``/models/{id}/…``, ``/v1/models/{id}``),
and forwarded with that id as Ray's ``multiplexed_model_id``; the response streams back
unchanged (status, headers, NDJSON or SSE body). A client that leaves cancels the call,
and Ray carries the cancellation to the replica. A replica lost mid-stream ends the stream
with the protocol's own error line, never a silent truncation.

The ingress answers ``/healthz``, ``/readyz``, ``/status`` and ``/metrics`` itself from all
replicas, and fans ``DELETE /requests/{id}`` and ``DELETE /models/{id}/instance`` out to all
of them. A request with an ``X-Modeld-Replica`` header goes to that replica only.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any, cast

import orjson
from loguru import logger
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from modeld.api.bodies import read_whole
from modeld.api.context import RequestContext
from modeld.api.errors import ErrorShape
from modeld.api.families import error_shape_for
from modeld.api.middleware import host_is_allowed, request_id_from
from modeld.errors import (
    ClientDisconnected,
    ForbiddenHost,
    ModeldError,
    ReplicaLost,
    ReplicaUnavailable,
)
from modeld.observability.logging import configure_logging
from modeld.ray.bridge import ForwardedRequest, Message, Receive, ResponseStart, Send
from modeld.ray.cluster import ReplicaAnswer, cluster_metrics, cluster_status
from modeld.ray.registry import router_for
from modeld.ray.replica import REPLICA_HEADER
from modeld.ray.routing import ReplicaView, routing_key, routing_model_id, target_key
from modeld.settings.config import Settings

__all__ = ["ModelIngress"]


_FAN_OUT = (  # DELETEs that concern every replica
    re.compile(r"^/requests/[^/]+$"),  # a cancel: only the replica running it knows it
    re.compile(r"^/models/[^/]+/instance$"),  # an unload: every replica holding it
)
_FAN_OUT_TIMEOUT_S = 10.0
_METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


class ModelIngress:
    """Ray builds the ASGI app after the constructor (``@serve.ingress()``, late bound)."""

    def __init__(self, replicas: DeploymentHandle[Any], settings: Settings) -> None:
        configure_logging(settings.log_level)
        self._replicas = replicas
        self._settings = settings
        self._app_name = str(serve.get_replica_context().app_name)
        allowed = frozenset(h.lower() for h in settings.allowed_hosts)
        loopback = settings.host in {"127.0.0.1", "::1", "localhost", ""}
        self._allowed_hosts = allowed if loopback or allowed else frozenset({"*"})

    def __serve_build_asgi_app__(self) -> _AsgiApp:
        return _AsgiApp(self._asgi)

    # ------------------------------------------------------------ ASGI entry

    async def _asgi(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        request_id = request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        method, path = str(scope["method"]), _app_path(scope)
        reply = _Reply(send, RequestContext(request_id), error_shape_for(path))
        if not host_is_allowed(headers.get(b"host", b"").decode("latin-1"), self._allowed_hosts):
            await reply.error(ForbiddenHost("Host header is not allowed"))
            return
        target = headers.get(REPLICA_HEADER, b"").decode("latin-1")
        if not target and method == "GET" and path in _OWN_ROUTES:
            await _OWN_ROUTES[path](self, reply)
            return
        settings = self._settings
        declared = headers.get(b"content-length", b"").decode("latin-1")
        try:
            body = await read_whole(
                receive, settings.max_body_bytes, settings.body_timeout, declared
            )
        except ClientDisconnected:
            return
        except ModeldError as error:
            await reply.error(error)
            return
        request = _forwarded(scope, path, request_id, body)
        if target:
            await self._forward(request, target_key(target), receive, reply)
        elif method == "DELETE" and any(pattern.match(path) for pattern in _FAN_OUT):
            await self._fan_out_first_success(request, reply)
        else:
            resolve = partial(routing_model_id, settings=settings)
            key = routing_key(path, body, settings.default_model, resolve)
            await self._forward(request, key, receive, reply)

    # ------------------------------------------------------------ forwarding

    async def _forward(
        self, request: ForwardedRequest, key: str, receive: Receive, reply: _Reply
    ) -> None:
        """Stream one replica's answer through; cancel the replica's call if the client goes."""
        parts = self._call(key, request)
        client_gone = asyncio.ensure_future(_wait_for_disconnect(receive))
        start: ResponseStart | None = None
        finished = False
        try:
            async for part in _until(parts, client_gone):
                if isinstance(part, ResponseStart):
                    start = part
                    await reply.start(part.status, part.headers)
                else:
                    await reply.body(part, more=True)
            if client_gone.done():
                return
            if start is None:
                await reply.error(ReplicaLost("the replica sent no response"))
            else:
                await reply.body(b"", more=False)
            finished = True
        except Exception as exc:  # the replica died, or Ray found none to send it to
            logger.opt(exception=exc).warning("forwarding failed", key=key)
            if start is None:
                await reply.error(ReplicaUnavailable(_describe(exc)))
            else:
                await reply.body(reply.stream_end(start, key, exc), more=False)
        finally:
            client_gone.cancel()
            if not finished:
                _cancel(parts)  # the replica sees its client leave: modeld cancels there

    def _call(self, key: str, request: ForwardedRequest) -> DeploymentResponseGenerator[Any]:
        """A streaming call of the replica chosen for ``key``."""
        handle = self._replicas.options(multiplexed_model_id=key, stream=True)
        return cast(DeploymentResponseGenerator[Any], handle.handle_http.remote(request))

    async def _ask(self, replica: str, request: ForwardedRequest) -> ReplicaAnswer:
        """One replica's whole answer (for fan-out), bounded in time."""
        parts = self._call(target_key(replica), request)
        status, chunks = 0, []
        try:
            async with asyncio.timeout(_FAN_OUT_TIMEOUT_S):
                async for part in parts:
                    if isinstance(part, ResponseStart):
                        status = part.status
                    else:
                        chunks.append(part)
        except Exception as exc:
            _cancel(parts)
            return ReplicaAnswer(replica, error=_describe(exc))
        return ReplicaAnswer(replica, status, b"".join(chunks))

    async def _ask_all(
        self, request: ForwardedRequest, views: list[ReplicaView] | None = None
    ) -> list[ReplicaAnswer]:
        """Every replica's answer, one after the other: Ray gives calls made while serving
        one request that request's internal id, and its router matches replies to calls
        by that id, so concurrent calls could swap their replicas."""
        views = await self._views() if views is None else views
        return [await self._ask(view.replica, request) for view in views]

    async def _views(self) -> list[ReplicaView]:
        """The router's view of every replica; the first call makes the router exist (a
        handle builds it lazily) by sending one request through it."""
        router = router_for(self._app_name, self._replicas.deployment_name)
        if router is None or not router.views():
            probe = _internal("/healthz")
            async for _ in self._call("", probe):
                pass
            router = router_for(self._app_name, self._replicas.deployment_name)
        return list(router.views()) if router is not None else []

    async def _fan_out_first_success(self, request: ForwardedRequest, reply: _Reply) -> None:
        """Every replica gets it; the first success is the answer, else the first reply."""
        answers = await self._ask_all(request)
        answered = [a for a in answers if a.error is None]
        chosen = next((a for a in answered if a.ok), answered[0] if answered else None)
        if chosen is None:
            await reply.error(ReplicaUnavailable("no replica answered"))
            return
        tag = ((REPLICA_HEADER, chosen.replica.encode()),)
        await reply.start(chosen.status, ((b"content-type", b"application/json"), *tag))
        await reply.body(chosen.body, more=False)

    # ------------------------------------------------------------ the ingress's own routes

    async def _healthz(self, reply: _Reply) -> None:
        await reply.json(200, {"status": "ok"})

    async def _readyz(self, reply: _Reply) -> None:
        answers = await self._ask_all(_internal("/readyz"))
        ready = any(a.ok for a in answers)
        replicas = {a.replica: a.status if a.error is None else a.error for a in answers}
        status = "ready" if ready else "not_ready"
        await reply.json(200 if ready else 503, {"status": status, "replicas": replicas})

    async def _status(self, reply: _Reply) -> None:
        views = await self._views()
        answers = await self._ask_all(_internal("/status"), views)
        statuses: dict[str, dict[str, object] | str] = {}
        for answer in answers:
            statuses[answer.replica] = (
                orjson.loads(answer.body) if answer.ok else answer.error or f"HTTP {answer.status}"
            )
        await reply.json(200, cluster_status(statuses, views))

    async def _metrics(self, reply: _Reply) -> None:
        answers = await self._ask_all(_internal("/metrics"))
        texts = {a.replica: a.body.decode() for a in answers if a.ok}
        unreachable = [a.replica for a in answers if not a.ok]
        await reply.start(200, ((b"content-type", _METRICS_TYPE),))
        await reply.body(cluster_metrics(texts, unreachable), more=False)


_OWN_ROUTES: dict[str, Callable[[ModelIngress, _Reply], Awaitable[None]]] = {
    "/healthz": ModelIngress._healthz,
    "/readyz": ModelIngress._readyz,
    "/status": ModelIngress._status,
    "/metrics": ModelIngress._metrics,
}


class _AsgiApp:
    """An ASGI 3 app object (servers tell ASGI 3 from 2 by an ``async def __call__``)."""

    def __init__(self, handler: Callable[[Message, Receive, Send], Awaitable[None]]) -> None:
        self._handler = handler

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        await self._handler(scope, receive, send)


class _Reply:
    """The response side of one ASGI exchange, in the protocol family of its path."""

    def __init__(self, send: Send, context: RequestContext, shape: ErrorShape) -> None:
        self._send = send
        self._context = context
        self._shape = shape

    @property
    def request_id(self) -> str:
        return self._context.request_id

    async def start(self, status: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        # Ray's proxy adds X-Request-ID itself (the client's, or one it made): not twice.
        kept = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
        await self._send({"type": "http.response.start", "status": status, "headers": kept})

    async def body(self, data: bytes, *, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, data: object) -> None:
        await self.start(status, ((b"content-type", b"application/json"),))
        await self.body(orjson.dumps(data), more=False)

    async def error(self, error: ModeldError) -> None:
        """``error`` as the app itself answers it on this path."""
        response = self._shape.response(error, self._context)
        await self.start(response.status_code, tuple(response.raw_headers))
        await self.body(bytes(response.body), more=False)

    def stream_end(self, start: ResponseStart, model: str, exc: Exception) -> bytes:
        """The last line of a stream the replica could not finish, in its protocol's
        own words (an Ollama stream ends with Ollama's error line); nothing after a
        whole JSON answer, which no line could complete."""
        content_type = (start.header(b"content-type") or b"").split(b";")[0].strip()
        if content_type == b"application/json":
            return b""
        failure = self._shape.failure(ReplicaLost(_describe(exc)), self._context)
        return self._shape.stream_end(failure, model)


def _app_path(scope: Message) -> str:
    """The path below the application's route prefix (Ray keeps the prefix in ``path``
    and names it in ``root_path``): the replica's app serves its routes from ``/``."""
    path, prefix = str(scope["path"]), str(scope.get("root_path", ""))
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :]
    return path if path.startswith("/") else "/" + path


def _forwarded(scope: Message, path: str, request_id: str, body: bytes) -> ForwardedRequest:
    headers = [(bytes(k), bytes(v)) for k, v in scope.get("headers", [])]
    headers = [(k, v) for k, v in headers if k.lower() != b"x-request-id"]
    headers.append((b"x-request-id", request_id.encode()))
    client = scope.get("client")
    return ForwardedRequest(
        method=str(scope["method"]),
        path=path,
        query_string=bytes(scope.get("query_string", b"")),
        headers=tuple(headers),
        body=body,
        client=(str(client[0]), int(client[1])) if client else None,
        http_version=str(scope.get("http_version", "1.1")),
        scheme=str(scope.get("scheme", "http")),
    )


def _internal(path: str) -> ForwardedRequest:
    """A request of the ingress's own (the client's Host was checked already)."""
    return ForwardedRequest("GET", path, headers=((b"host", b"127.0.0.1"),))


async def _wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _until(parts: Any, stop: asyncio.Future[None]) -> AsyncIterator[Any]:
    """The items of ``parts`` until ``stop`` completes (the client left)."""
    iterator = parts.__aiter__()
    while not stop.done():
        following = asyncio.ensure_future(iterator.__anext__())
        try:
            await asyncio.wait({following, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abandoned = not following.done()
            if abandoned:
                following.cancel()
                following.add_done_callback(_retrieve)  # ends in RequestCancelledError
        if abandoned:
            return
        try:
            item = following.result()
        except StopAsyncIteration:
            return
        yield item


def _cancel(parts: DeploymentResponseGenerator[Any]) -> None:
    parts.cancel()  # type: ignore[no-untyped-call]


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
