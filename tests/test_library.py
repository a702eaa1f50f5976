"""The library on the real Gemma, under asyncio and trio."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeld import Chunk, DoneReason, GenerationResult, InferRequest, ModelManager, Settings
from modeld.engine.base import TokenLoop

pytestmark = pytest.mark.anyio


async def test_gemma_through_the_library(gemma_path: Path, token_loop: TokenLoop) -> None:
    settings = Settings(
        models_dir=gemma_path.parent, n_ctx=512, threads=2, default_model=gemma_path.name
    )
    request = InferRequest(prompt="The capital of France is", max_tokens=16, temperature=0)
    async with ModelManager(settings, token_loop=token_loop) as manager:
        items = [item async for item in manager.generate(request)]
        text, again = await manager.complete(request)
        stats = manager.statistics()
    chunks, result = items[:-1], items[-1]
    assert isinstance(result, GenerationResult)
    assert all(isinstance(c, Chunk) for c in chunks)
    assert result.done_reason in {DoneReason.STOP, DoneReason.LENGTH}
    assert "".join(c.text for c in chunks) == text  # greedy: the same text twice
    assert again.metrics.completion_tokens == result.metrics.completion_tokens
    assert stats.token_loop == str(token_loop.kind)
    assert stats.instances[0].loads_total == 1


async def test_infer_timeout_ends_a_running_stream(gemma_path: Path, token_loop: TokenLoop) -> None:
    settings = Settings(models_dir=gemma_path.parent, n_ctx=1024, threads=2, infer_timeout=1.0)
    request = InferRequest(prompt="Tell a long story.", model=gemma_path.name, max_tokens=900)
    async with ModelManager(settings, token_loop=token_loop) as manager:
        await manager.load(gemma_path.name)
        async with manager.stream(request) as generation:
            async for _ in generation:
                pass
    assert generation.result is not None
    assert generation.result.done_reason is DoneReason.TIMEOUT
    assert generation.result.metrics.completion_tokens < 900  # cut short, maybe in the prompt
