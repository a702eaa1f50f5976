"""Pure-ASGI middleware (no BaseHTTPMiddleware: it would break streaming cancellation)."""

from __future__ import annotations

import ipaddress
import re
import time
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from modeld.api.errors import error_body

__all__ = ["RequestContextMiddleware", "host_is_allowed"]

_SANE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


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


class RequestContextMiddleware:
    """Gives every request an id (echoed in ``X-Request-ID``) and refuses foreign Hosts."""

    def __init__(self, app: ASGIApp, *, allowed_hosts: frozenset[str], on_response=None) -> None:  # type: ignore[no-untyped-def]
        self.app = app
        self.allowed_hosts = allowed_hosts
        self.on_response = on_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _SANE_REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started_s = time.monotonic()
        status_holder = [0]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status_holder[0] = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        if not host_is_allowed(headers.get("host", ""), self.allowed_hosts):
            body = error_body("forbidden_host", "Host header is not allowed", request_id)
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if self.on_response is not None:
                self.on_response(scope, status_holder[0], time.monotonic() - started_s)
