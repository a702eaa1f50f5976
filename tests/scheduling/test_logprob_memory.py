"""Log probabilities do not grow memory without need (``ModelManager``, real tiny
models, both token loops): a streamed generation's entries leave with its chunks and its
result keeps none, a whole answer keeps exactly what a stream would have sent, and a
request whose entries could pass :data:`~modeld.types.MAX_LOGPROB_VALUES` is refused
naming ``logprobs`` before anything is admitted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from modeld.errors import InvalidRequest
from modeld.scheduling.choices import check_logprob_volume
from modeld.scheduling.manager import ModelManager
from modeld.types import MAX_CHOICES, MAX_LOGPROB_VALUES, MAX_TOP_LOGPROBS, InferRequest

pytestmark = pytest.mark.anyio

Factory = Callable[..., ModelManager]
MODEL = "tiny-a.gguf"


def ask(**fields: object) -> InferRequest:
    fields = {"max_tokens": 24, "temperature": 0.0, "logprobs": 3, **fields}
    return InferRequest(prompt="hello there, how are you", model=MODEL, **fields)  # type: ignore[arg-type]


def _key(entries: object) -> list[tuple[int, bytes, list[tuple[int, bytes]]]]:
    return [(e.id, e.piece, [t[:2] for t in e.alternatives()]) for e in entries]  # type: ignore[attr-defined]


async def test_a_stream_keeps_no_entries_and_a_whole_answer_keeps_what_it_would_send(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        sent = []
        async with manager.stream(ask()) as generation:
            async for chunk in generation:
                sent += chunk.logprobs
        streamed = generation.result
        assert streamed is not None
        assert streamed.logprobs == ()  # asked, and carried by the chunks
        assert len(sent) == streamed.metrics.completion_tokens > 0
        _, whole = await manager.complete(ask())
        assert whole.logprobs is not None
        assert _key(whole.logprobs) == _key(sent)
        _, plain = await manager.complete(ask(logprobs=None))
        assert plain.logprobs is None


async def test_every_streamed_choice_keeps_none(manager_factory: Factory, models_dir: Path) -> None:
    counts = []
    async with (
        manager_factory(models_dir) as manager,
        manager.choices(ask(temperature=1.0, seed=3), 3) as run,
    ):
        async for generation in run:
            sent = [e async for chunk in generation for e in chunk.logprobs]
            assert generation.result is not None
            assert generation.result.logprobs == ()
            counts.append((len(sent), generation.result.metrics.completion_tokens))
    assert len(counts) == 3
    assert all(entries == tokens > 0 for entries, tokens in counts)


async def test_a_request_over_the_bound_is_refused_before_admission(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir, n_ctx=65536) as manager:
        for request, count in [
            (ask(max_tokens=None, logprobs=MAX_TOP_LOGPROBS), 1),  # the context counts
            (ask(max_tokens=10_000, logprobs=MAX_TOP_LOGPROBS), MAX_CHOICES),
        ]:
            with pytest.raises(InvalidRequest) as refused:
                manager.choices(request, count)
            assert refused.value.field == "logprobs"
            assert f"{MAX_LOGPROB_VALUES:,}" in refused.value.message
        assert manager.statistics().instances == ()  # nothing was admitted or loaded
        _, result = await manager.complete(ask(max_tokens=8, logprobs=MAX_TOP_LOGPROBS))
        assert result.logprobs is not None
        assert len(result.logprobs) == result.metrics.completion_tokens


def test_the_bound_counts_tokens_choices_and_alternatives() -> None:
    top = MAX_TOP_LOGPROBS
    at_bound = MAX_LOGPROB_VALUES // (MAX_CHOICES * (1 + top))
    check_logprob_volume(ask(max_tokens=at_bound, logprobs=top), MAX_CHOICES, 1 << 20)
    with pytest.raises(InvalidRequest):
        check_logprob_volume(ask(max_tokens=at_bound + 1, logprobs=top), MAX_CHOICES, 1 << 20)
    # max_tokens past the context counts only the context; unset counts all of it
    check_logprob_volume(ask(max_tokens=1 << 20, logprobs=top), MAX_CHOICES, at_bound)
    check_logprob_volume(ask(max_tokens=None, logprobs=top), MAX_CHOICES, at_bound)
    with pytest.raises(InvalidRequest):
        check_logprob_volume(ask(max_tokens=None, logprobs=top), MAX_CHOICES, at_bound + 1)
    check_logprob_volume(ask(max_tokens=None, logprobs=None), MAX_CHOICES, 1 << 30)
