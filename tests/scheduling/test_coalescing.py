"""The coalescing window groups chunks but never delays the end of a stream.

Every test sets the reader's gap bound to an hour: a stream can then end promptly only if
the ring's ``finish()`` wakes the consumer out of a hold. Had the end waited out the
window (as it once did, for 20 ms), each of these would hang and fail at its hang guard.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

from modeld.engine.base import TokenLoop
from modeld.scheduling.manager import ModelManager
from modeld.types import Chunk, DoneReason, GenerationResult, InferRequest
from tests.scheduling.conftest import ConstantProbe, make_settings

pytestmark = pytest.mark.anyio

Factory = Callable[..., ModelManager]
HOUR_MS = 3_600_000
HANG_GUARD_S = 60.0  # far below the window: only a wake-up by finish() gets under it
TOKENS = 100


def hour_long_gaps(token_loop: TokenLoop, models_dir: Path) -> ModelManager:
    """A manager whose streams may hold tokens for an hour: past the setting's bound
    (unchecked, a test only), so that no hold can end by itself within the hang guard."""
    settings = make_settings(models_dir, n_ctx=512)
    hour_long = msgspec.structs.replace(settings, stream_max_gap_ms=HOUR_MS)
    return ModelManager(hour_long, token_loop=token_loop, probe=ConstantProbe())


def ask(model: str = "tiny-a.gguf", **fields: Any) -> InferRequest:
    fields.setdefault("max_tokens", TOKENS)
    fields.setdefault("temperature", 0.0)
    return InferRequest(prompt="hello world", model=model, **fields)


async def test_a_finished_stream_ends_inside_the_window(
    manager_factory: Factory, token_loop: TokenLoop, models_dir: Path
) -> None:
    async with hour_long_gaps(token_loop, models_dir) as manager:
        await manager.load("tiny-a.gguf")
        with anyio.fail_after(HANG_GUARD_S):
            items = [item async for item in manager.generate(ask())]
    chunks, result = items[:-1], items[-1]
    assert isinstance(result, GenerationResult)
    assert all(isinstance(chunk, Chunk) for chunk in chunks)
    assert result.done_reason is DoneReason.LENGTH
    assert sum(c.tokens for c in chunks) == result.metrics.completion_tokens == TOKENS  # type: ignore[union-attr]
    # the window still groups: far fewer lines than tokens
    assert len(chunks) < TOKENS // 2


async def test_a_whole_answer_is_not_held_by_the_window(
    manager_factory: Factory, token_loop: TokenLoop, models_dir: Path
) -> None:
    async with hour_long_gaps(token_loop, models_dir) as manager:
        with anyio.fail_after(HANG_GUARD_S):
            text, result = await manager.complete(ask())
    async with manager_factory(models_dir, n_ctx=512, stream_max_gap_ms=0) as manager:
        unwindowed, _ = await manager.complete(ask())
    assert result.done_reason is DoneReason.LENGTH
    assert result.metrics.completion_tokens == TOKENS
    assert text == unwindowed  # grouping changes the lines, never the text


async def test_the_next_request_in_line_is_handed_the_model_at_once(
    manager_factory: Factory, token_loop: TokenLoop, models_dir: Path
) -> None:
    results: list[GenerationResult] = []

    async def one() -> None:
        results.append((await manager.complete(ask()))[1])

    async with hour_long_gaps(token_loop, models_dir) as manager:
        await manager.load("tiny-a.gguf")
        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as group:
                for _ in range(3):  # one runs, two wait in the model's line
                    group.start_soon(one)
    assert [r.done_reason for r in results] == [DoneReason.LENGTH] * 3
    assert all(r.metrics.completion_tokens == TOKENS for r in results)


async def test_a_cancel_while_the_consumer_waits_in_the_window_ends_the_stream(
    manager_factory: Factory, token_loop: TokenLoop, models_dir: Path
) -> None:
    first_chunk = anyio.Event()

    async def cancel_after_first_chunk() -> None:
        await first_chunk.wait()
        await anyio.sleep(0.005)  # the consumer is back in its window by now
        manager.cancel_request("r1")

    async with hour_long_gaps(token_loop, models_dir) as manager:
        await manager.load("tiny-a.gguf")
        with anyio.fail_after(HANG_GUARD_S):
            async with anyio.create_task_group() as group:
                group.start_soon(cancel_after_first_chunk)
                async with manager.stream(ask(max_tokens=480), request_id="r1") as gen:
                    async for _chunk in gen:
                        first_chunk.set()
    assert gen.result is not None
    assert gen.result.done_reason is DoneReason.CANCELLED
    assert 0 < gen.result.metrics.completion_tokens < 480
