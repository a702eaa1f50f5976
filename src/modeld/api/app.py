"""The Starlette application: routes, middleware, error mapping and the manager's lifespan."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from loguru import logger
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from modeld.api.auth import ApiKeyMiddleware, load_api_keys
from modeld.api.families import error_shape_for, mounted_routes
from modeld.api.middleware import RequestContextMiddleware, route_template
from modeld.observability.access import AccessObserver, log_event
from modeld.observability.metrics import Metrics
from modeld.observability.tracing import Tracing, TracingMiddleware
from modeld.scheduling.manager import ModelManager
from modeld.settings.config import Settings

__all__ = ["create_app"]


def _is_loopback(host: str) -> bool:
    if host in {"localhost", ""}:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_app(
    settings: Settings, manager: ModelManager | None = None, tracing: Tracing | None = None
) -> Starlette:
    """An ASGI app serving ``manager`` (made from ``settings`` when not given).

    The app's lifespan enters the manager and, with ``prewarm_default``, loads the default
    model before the first request, so ``/readyz`` is 200 when serving starts. With
    ``tracing``, every request gets a span (without it, no tracing code runs at all).
    """
    owned_manager = manager or ModelManager(settings)
    metrics = Metrics(owned_manager.statistics)
    # after a request's last line, not before it
    owned_manager.events.add_listener(metrics.on_event, soon=True)
    owned_manager.events.add_listener(log_event, soon=True)
    routes = mounted_routes()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with owned_manager:
            if settings.prewarm_default and settings.default_model:
                await owned_manager.load(settings.default_model)
            yield

    allowed_hosts = frozenset(h.lower() for h in settings.allowed_hosts)
    if not _is_loopback(settings.host) and not allowed_hosts:
        allowed_hosts = frozenset({"*"})  # bound to a real interface: the operator decides
    middleware = [
        Middleware(
            RequestContextMiddleware,
            allowed_hosts=allowed_hosts,
            routes=routes,
            observer=AccessObserver(metrics),
            error_shape_for=error_shape_for,
        )
    ]
    if tracing is not None:
        owned_manager.events.add_listener(tracing.on_event)
        middleware.append(
            Middleware(
                TracingMiddleware,
                tracing=tracing,
                route_of=lambda scope: route_template(routes, scope),
            )
        )
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=settings.cors_origins,
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=[
                    "content-type", "x-request-id", "x-log-level", "authorization", "x-api-key",
                ],
                expose_headers=["x-request-id", "retry-after", "www-authenticate"],
            )
        )  # fmt: skip
    keys = load_api_keys(settings)
    if not keys and not _is_loopback(settings.host):
        logger.warning("no API key configured: every route is open to whoever reaches the port")
    live = owned_manager.live_settings
    middleware.append(
        Middleware(ApiKeyMiddleware, settings=lambda: live.current, error_shape_for=error_shape_for)
    )
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.manager = owned_manager
    app.state.metrics = metrics
    return app
