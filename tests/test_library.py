"""The library on the real Gemma, under asyncio and trio."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeld import (
    ChatMessage,
    ChatRequest,
    Chunk,
    DoneReason,
    GenerationResult,
    InferRequest,
    ModelManager,
    ModelSettings,
    Settings,
)
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


async def test_chat_and_embeddings_through_the_library(
    gemma_path: Path, token_loop: TokenLoop
) -> None:
    """The bundled base model chats with llama.cpp's ``gemma`` template, set per model.

    Without prompt reuse: the second request would evaluate only the prompt's last token
    on the first one's cache, and llama.cpp's logits are not bit-identical across batch
    sizes, so this base model's near-tied greedy choice can differ (docs/compat.md).
    """
    settings = Settings(
        models_dir=gemma_path.parent,
        n_ctx=512,
        threads=2,
        prompt_reuse=False,
        models={gemma_path.name: ModelSettings(aliases=("gemma",), chat_template="gemma")},
    )
    messages = [ChatMessage("user", "What is the capital of France?")]
    request = ChatRequest(messages=messages, model="gemma", max_tokens=16, temperature=0)
    async with ModelManager(settings, token_loop=token_loop) as manager:
        text, result = await manager.chat(request)
        async with manager.stream_chat(request) as generation:
            streamed = "".join([chunk.text async for chunk in generation])
        embedded = await manager.embed("gemma", ["The sea.", "The ocean."])
    assert text == streamed
    assert result.model == gemma_path.name
    assert result.done_reason in {DoneReason.STOP, DoneReason.LENGTH}
    assert [len(v) for v in embedded.embeddings] == [640, 640]
    assert embedded.prompt_tokens > 4
