"""The ways to run a generation (a stream, chunks then the result, the whole answer),
each made of one call: ``ModelManager.choices``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from modeld.engine.contract import Request
from modeld.scheduling.choices import ChoiceRun
from modeld.scheduling.generation import Generation
from modeld.types import ChatRequest, Chunk, GenerationResult

__all__ = ["GenerationCalls"]


class GenerationCalls:
    """What :class:`~modeld.scheduling.manager.ModelManager` offers on top of its
    :meth:`choices`."""

    def choices(
        self, request: Request, count: int, *, request_id: str | None = None
    ) -> AbstractAsyncContextManager[ChoiceRun]:
        raise NotImplementedError

    def stream(
        self, request: Request, *, request_id: str | None = None
    ) -> AbstractAsyncContextManager[Generation]:
        """Admit, load, queue and start one generation; yields it once the loop runs.
        Raises what :meth:`choices` raises; leaving the block early cancels it."""
        return _first_choice(self.choices(request, 1, request_id=request_id))

    # A conversation takes the same path: its messages go through the model's chat template.
    stream_chat = stream

    def generate(
        self, request: Request, *, request_id: str | None = None
    ) -> AsyncIterator[Chunk | GenerationResult]:
        """Chunks as they come, then the one :class:`GenerationResult`."""
        return _chunks_then_result(self.stream(request, request_id=request_id))

    async def complete(
        self, request: Request, *, request_id: str | None = None
    ) -> tuple[str, GenerationResult]:
        """The whole text and the result, for callers that do not stream."""
        return await _whole(self.stream(request, request_id=request_id))

    async def chat(
        self, request: ChatRequest, *, request_id: str | None = None
    ) -> tuple[str, GenerationResult]:
        """The assistant's whole answer to ``request.messages`` and the result."""
        return await self.complete(request, request_id=request_id)


@asynccontextmanager
async def _first_choice(run: AbstractAsyncContextManager[ChoiceRun]) -> AsyncIterator[Generation]:
    async with run as choices:
        yield choices.first


async def _chunks_then_result(
    stream: AbstractAsyncContextManager[Generation],
) -> AsyncIterator[Chunk | GenerationResult]:
    async with stream as generation:
        async for chunk in generation:
            yield chunk
    assert generation.result is not None
    yield generation.result


async def _whole(stream: AbstractAsyncContextManager[Generation]) -> tuple[str, GenerationResult]:
    parts: list[str] = []
    async with stream as generation:
        generation.read_whole()
        async for chunk in generation:
            parts.append(chunk.text)
    assert generation.result is not None
    return "".join(parts), generation.result
