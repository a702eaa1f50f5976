"""``GET /events``: lifecycle events as Server-Sent Events, and ``GET /metrics``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from modeld.events import ModelEvent
from modeld.observability.metrics import CONTENT_TYPE
from modeld.scheduling.manager import ModelManager

__all__ = ["events", "metrics"]

_KEEPALIVE_S = 15.0


def _sse(event: ModelEvent) -> bytes:
    data = orjson.dumps({"time_unix": event.time_unix, **event.fields()}, default=str)
    return b"event: " + event.kind.encode() + b"\ndata: " + data + b"\n\n"


async def events(request: Request) -> Response:
    """model_load_started, model_loading_progress, model_ready, model_evicted, model_error.

    Comment lines keep idle connections alive; the stream ends, complete, once modeld's
    shutdown has closed every instance (their ``model_evicted`` events included).
    """
    manager: ModelManager = request.app.state.manager

    async def stream() -> AsyncIterator[bytes]:
        async with manager.events.subscribe() as subscription:
            yield b": connected\n\n"
            while True:
                with anyio.move_on_after(_KEEPALIVE_S) as idle:
                    event = await subscription.next()
                if idle.cancelled_caught:
                    yield b": keep-alive\n\n"
                elif event is None:
                    return
                elif isinstance(event, ModelEvent):
                    yield _sse(event)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)
