"""Running one generation for an HTTP request, whatever protocol it came in by: start it
while watching the client, then stream it or collect the whole answer.

Until the stream starts nothing reads from the client, so the client is watched: a
queued or loading request whose client is gone leaves the queue at once.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import anyio
from starlette.requests import Request

from modeld.api.streaming import unless_disconnected
from modeld.errors import ClientDisconnected
from modeld.scheduling.generation import Generation
from modeld.types import GenerationResult

__all__ = ["collect_answer", "start_generation"]

Owner = AbstractAsyncContextManager[Generation]


def _noop() -> None:
    pass


async def start_generation(request: Request, owner: Owner) -> Generation:
    """Enter ``owner`` (``ModelManager.stream()`` or a sibling) while watching the client.

    Raises what the manager raises before a generation starts, and
    :class:`ClientDisconnected` when the client left meanwhile (nothing is left behind).
    """
    started, generation = await unless_disconnected(request.receive, owner.__aenter__, _noop)
    if not started or generation is None:
        raise ClientDisconnected("the client left while its request waited")
    return generation


async def collect_answer(
    request: Request, owner: Owner, generation: Generation
) -> tuple[str, GenerationResult]:
    """The whole text and the result; the generation is cancelled if the client leaves,
    and ``owner`` is exited (shielded) whatever happens."""

    async def collect() -> str:
        return "".join([chunk.text async for chunk in generation])

    try:
        _, text = await unless_disconnected(request.receive, collect, generation.cancel)
    finally:
        with anyio.CancelScope(shield=True):
            await owner.__aexit__(None, None, None)
    assert generation.result is not None
    request.scope["state"]["queue_ms"] = generation.result.metrics.queue_ms
    return text or "", generation.result
