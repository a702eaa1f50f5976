"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would break streaming cancellation)."""

from __future__ import annotations

import ipaddress
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Protocol

from starlette.datastructures import Headers, MutableHeaders, QueryParams
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modeld.api.context import open_context
from modeld.api.errors import ErrorShape, log_unexpected
from modeld.errors import ForbiddenHost, HeadersTooLarge
from modeld.observability.logging import level_number, request_logging

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_HEADER_COUNT",
    "RequestContextMiddleware",
    "RequestObserver",
    "header_refusal",
    "host_is_allowed",
    "request_id_from",
    "route_template",
]

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


class RequestObserver(Protocol):
    def started(self, path: str) -> None: ...

    def finished(self, scope: Scope, path: str, status: int, duration_s: float) -> None: ...


def host_is_allowed(host_header: str, allowed: frozenset[str]) -> bool:
    """Loopback names and addresses always; anything else only if listed (or '*')."""
    if "*" in allowed:
        return True
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1 : host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in allowed or host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def request_id_from(given: str) -> str:
    """The client's ``X-Request-ID`` when it is sane, else a new one."""
    return given if _SANE_REQUEST_ID.match(given) else uuid.uuid4().hex


def route_template(routes: Sequence[BaseRoute], scope: Scope) -> str:
    """The matched route's path template (its mount's prefix included): bounded label
    cardinality for metrics."""
    for route in routes:
        match, child = route.matches(scope)
        if match is not Match.FULL:
            continue
        if isinstance(route, Mount):
            inner = route_template(route.routes, {**scope, **child})
            return route.path + inner if inner != "other" else "other"
        return str(getattr(route, "path", "other"))
    return "other"


def requested_log_level(scope: Scope, headers: Headers) -> int | None:
    """``X-Log-Level`` or ``?log=``: a per-request logging threshold (e.g. ``debug``)."""
    raw = headers.get("x-log-level") or QueryParams(scope.get("query_string", b"")).get("log")
    return level_number(raw) if raw else None


# Hypercorn (h11) caps a header block only while it is incomplete (16 KiB); one that
# arrives in one piece is parsed whole. These caps hold for every request (vLLM's
# CVE-2025-48956 was one GET with an enormous header block).
MAX_HEADER_COUNT = 100
MAX_HEADER_BYTES = 16 * 1024


def header_refusal(scope: Scope) -> HeadersTooLarge | None:
    """The 431 for a request over :data:`MAX_HEADER_COUNT` header lines or
    :data:`MAX_HEADER_BYTES` of names and values, else None."""
    headers = scope.get("headers", ())
    if len(headers) > MAX_HEADER_COUNT:
        return HeadersTooLarge(
            f"{len(headers)} header lines are over the {MAX_HEADER_COUNT} accepted"
        )
    size_bytes = sum(len(name) + len(value) for name, value in headers)
    if size_bytes > MAX_HEADER_BYTES:
        return HeadersTooLarge(
            f"{size_bytes} bytes of headers are over the {MAX_HEADER_BYTES} accepted"
        )
    return None


class RequestContextMiddleware:
    """Request id (echoed in ``X-Request-ID`` on every response: the only place that sets
    it), Host check, per-request log level, the last word on a bug (a JSON 500 and a log
    line, never a bare traceback), and the observer's view of every response."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        allowed_hosts: frozenset[str],
        routes: Sequence[BaseRoute],
        observer: RequestObserver | None = None,
        error_shape_for: Callable[[str], ErrorShape] = lambda path: ErrorShape(),
    ) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.routes = routes
        self.observer = observer
        self.error_shape_for = error_shape_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        request_id = request_id_from(headers.get("x-request-id", ""))
        context = open_context(scope, request_id)
        shape = self.error_shape_for(str(scope["path"]))
        path = route_template(self.routes, scope)
        started_s = time.monotonic()
        status_holder = [500]

        started = [False]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                started[0] = True
                status_holder[0] = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        if self.observer is not None:
            self.observer.started(path)
        try:
            with request_logging(request_id, requested_log_level(scope, headers)):
                try:
                    oversized = header_refusal(scope)
                    if oversized is not None:
                        await shape.response(oversized, context)(scope, receive, send_with_id)
                    elif host_is_allowed(headers.get("host", ""), self.allowed_hosts):
                        await self.app(scope, receive, send_with_id)
                    else:
                        forbidden = ForbiddenHost("Host header is not allowed")
                        refusal = shape.response(forbidden, context)
                        await refusal(scope, receive, send_with_id)
                except Exception as exc:
                    log_unexpected(exc, str(scope.get("path")))
                    if not started[0]:
                        refusal = shape.internal_error(context)
                        await refusal(scope, receive, send_with_id)
        finally:
            if self.observer is not None:
                duration_s = time.monotonic() - started_s
                self.observer.finished(scope, path, status_holder[0], duration_s)
