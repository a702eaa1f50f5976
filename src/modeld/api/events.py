"""``GET /events``: lifecycle events as Server-Sent Events, and ``GET /metrics``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from modeld.observability.metrics import CONTENT_TYPE
from modeld.scheduling.events import Event, Subscription
from modeld.scheduling.manager import ModelManager

__all__ = ["events", "metrics"]

_KEEPALIVE_S = 15.0


async def _next_or_none(subscription: Subscription, timeout_s: float) -> Event | None:
    with anyio.move_on_after(timeout_s):
        return await subscription.next()
    return None


def _sse(event: Event) -> bytes:
    data = orjson.dumps({"time_unix": event.time_unix, **event.data}, default=str)
    return b"event: " + event.kind.encode() + b"\ndata: " + data + b"\n\n"


async def events(request: Request) -> Response:
    """model_load_started, model_loading_progress, model_ready, model_evicted, model_error.

    Comment lines keep idle connections alive; the stream ends when modeld shuts down.
    """
    manager: ModelManager = request.app.state.manager

    async def stream() -> AsyncIterator[bytes]:
        async with manager.events.subscribe() as subscription:
            yield b": connected\n\n"
            while manager.accepting:
                event = await _next_or_none(subscription, _KEEPALIVE_S)
                if event is None:
                    yield b": keep-alive\n\n"
                elif event.kind.startswith("model_"):
                    yield _sse(event)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
