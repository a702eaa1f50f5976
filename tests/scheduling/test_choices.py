"""Several answers to one request (``ModelManager.choices``, OpenAI's ``n``) on real
tiny models, under asyncio and trio and both token loops: one admission holds the slot
from the first choice to the last, the request is prepared once and choices after the
first reuse the prompt's KV, each choice is seeded ``seed + i``, and a cancel, an unload
or a client leaving between or during choices ends the run once, leaving nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from anyio.lowlevel import checkpoint

from modeld import errors
from modeld.events import Event, GenerationFinished
from modeld.scheduling.choices import ChoiceRun
from modeld.scheduling.manager import ModelManager
from modeld.types import MAX_CHOICES, DoneReason, GenerationResult, InferRequest
from tests.scheduling.test_cancel_points import assert_nothing_leaked, still_serves

pytestmark = pytest.mark.anyio

Factory = Callable[..., ModelManager]
MODEL = "tiny-a.gguf"


def ask(prompt: str = "hello there, how are you", **fields: object) -> InferRequest:
    fields.setdefault("max_tokens", 8)
    fields.setdefault("temperature", 1.0)
    return InferRequest(prompt=prompt, model=MODEL, **fields)  # type: ignore[arg-type]


async def read_all(run: ChoiceRun) -> list[tuple[str, GenerationResult]]:
    answers = []
    async for generation in run:
        text = "".join([chunk.text async for chunk in generation])
        assert generation.result is not None
        answers.append((text, generation.result))
    return answers


def finished_order(manager: ModelManager) -> list[str]:
    """The request ids of finished generations (one per choice), in the order they end."""
    order: list[str] = []

    def listen(event: Event) -> None:
        if isinstance(event, GenerationFinished):
            order.append(event.result.request_id)

    manager.events.add_listener(listen)
    return order


async def test_choices_reuse_the_prompt_and_take_seed_plus_index(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        async with manager.choices(ask(seed=41), 3) as run:
            answers = await read_all(run)
        singles = [(await manager.complete(ask(seed=41 + i)))[0] for i in range(3)]
        async with manager.choices(ask(seed=41), 3) as run:
            again = await read_all(run)
        assert_nothing_leaked(manager)
    assert [r.done_reason for _, r in answers] == [DoneReason.LENGTH] * 3
    assert [r.metrics.completion_tokens for _, r in answers] == [8, 8, 8]
    prompt_tokens = answers[0][1].metrics.prompt_tokens
    assert prompt_tokens > 2
    # Every choice after the first evaluates only the prompt's last token: the rest of
    # the prompt's KV is the previous choice's.
    assert [r.metrics.cached_tokens for _, r in answers[1:]] == [prompt_tokens - 1] * 2
    assert [text for text, _ in answers] == singles  # choice i is the request seeded 41 + i
    assert [text for text, _ in again] == singles
    assert len(set(singles)) > 1


async def test_a_request_queued_during_choice_0_runs_after_the_last(
    manager_factory: Factory, models_dir: Path
) -> None:
    """The slot is held from the first choice to the last: a request that queued while
    choice 0 ran waits through every choice, and the choices reuse the prompt although
    the other request's prompt differs."""
    async with manager_factory(models_dir) as manager:
        order = finished_order(manager)
        other: list[GenerationResult] = []

        async def other_request() -> None:
            _, result = await manager.complete(ask("zebra crossing"))
            other.append(result)

        async with (
            anyio.create_task_group() as tasks,
            manager.choices(ask(), 3, request_id="three") as run,
        ):
            tasks.start_soon(other_request)
            slot = manager._pool.slot_for(MODEL)
            while slot.queue_len == 0:  # the other request has joined the line
                await checkpoint()
            answers = []
            async for generation in run:
                text = "".join([chunk.text async for chunk in generation])
                assert generation.result is not None
                answers.append((text, generation.result))
                if run.index < run.count - 1:  # between two choices: still queued
                    await anyio.wait_all_tasks_blocked()
                    assert (slot.busy, slot.queue_len, other) == (True, 1, [])
        assert_nothing_leaked(manager)
    assert len(answers) == 3
    assert order[:3] == ["three"] * 3
    assert len(order) == 4
    assert other[0].request_id == order[3]
    prompt_tokens = answers[0][1].metrics.prompt_tokens
    assert [r.metrics.cached_tokens for _, r in answers[1:]] == [prompt_tokens - 1] * 2


async def test_an_unload_between_choices_ends_the_run_evicted(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        async with manager.choices(ask(), 3) as run:
            first = await run.__anext__()
            async for _ in first:
                pass
            assert first.result is not None
            assert first.result.done_reason is DoneReason.LENGTH
            await manager.unload(MODEL)
            assert [g async for g in run] == []  # no further choice starts
            assert run.stopped is not None
            assert run.stopped.done_reason is DoneReason.EVICTED
            assert run.stopped.request_id == run.request_id
        assert_nothing_leaked(manager)
        await still_serves(manager)


async def test_an_unload_during_a_choice_ends_it_and_skips_the_rest(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        order = finished_order(manager)
        async with manager.choices(ask(max_tokens=200, temperature=0.0), 3) as run:
            first = await run.__anext__()
            async for _ in first:
                pass
            second = await run.__anext__()
            await manager.unload(MODEL)
            async for _ in second:
                pass
            assert [g async for g in run] == []
        assert first.result is not None
        assert second.result is not None
        assert first.result.done_reason is DoneReason.LENGTH
        assert second.result.done_reason is DoneReason.EVICTED
        assert run.stopped is None  # the evicted choice's own result ended the run
        assert len(order) == 2
        assert_nothing_leaked(manager)


@pytest.mark.parametrize("between", [False, True], ids=["during", "between"])
async def test_leaving_the_block_cancels_the_choice_and_skips_the_rest(
    manager_factory: Factory, models_dir: Path, between: bool
) -> None:
    async with manager_factory(models_dir) as manager:
        order = finished_order(manager)
        async with manager.choices(ask(max_tokens=None), 3) as run:
            async for generation in run:
                if between:
                    async for _ in generation:
                        pass
                break  # the client left
        assert len(order) == 1  # the rest never started
        assert run.first.result is not None
        expected = DoneReason.LENGTH if between else DoneReason.CANCELLED
        assert run.first.result.done_reason is expected
        assert_nothing_leaked(manager)
        await still_serves(manager)


async def test_cancel_request_between_choices_stops_the_run(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        async with manager.choices(ask(), 2, request_id="two") as run:
            first = await run.__anext__()
            async for _ in first:
                pass
            manager.cancel_request("two")  # still running: it holds the slot
            assert [g async for g in run] == []
        assert run.stopped is not None
        assert run.stopped.done_reason is DoneReason.CANCELLED
        assert_nothing_leaked(manager)
        with pytest.raises(errors.RequestNotFound):
            manager.cancel_request("two")


@pytest.mark.parametrize("count", [0, MAX_CHOICES + 1, -1, True, 1.5])
async def test_a_count_out_of_bounds_is_refused_before_anything_is_held(
    manager_factory: Factory, models_dir: Path, count: object
) -> None:
    async with manager_factory(models_dir) as manager:
        with pytest.raises(errors.InvalidRequest) as caught:
            async with manager.choices(ask(), count):  # type: ignore[arg-type]
                pass
        assert caught.value.field == "n"
        assert_nothing_leaked(manager)
        assert manager.state_of(MODEL) == "unloaded"  # nothing was loaded for it


async def test_the_most_choices_run(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir) as manager:
        async with manager.choices(ask(max_tokens=2), MAX_CHOICES) as run:
            answers = await read_all(run)
        assert_nothing_leaked(manager)
    assert len(answers) == MAX_CHOICES
    assert all(r.done_reason is DoneReason.LENGTH for _, r in answers)


async def test_infer_timeout_bounds_every_choice_together(
    manager_factory: Factory, models_dir: Path
) -> None:
    """``--infer-timeout`` counts from the request's admission, not each choice's start:
    past it, no further choice starts and the run ends ``timeout``."""
    async with manager_factory(models_dir, infer_timeout=2) as manager:
        await manager.load(MODEL)  # the load is not what is timed here
        async with manager.choices(ask(), 3) as run:
            first = await run.__anext__()
            async for _ in first:
                pass
            assert first.result is not None
            assert first.result.done_reason is DoneReason.LENGTH
            assert run.deadline_s is not None
            # past the request's deadline, between two choices
            await anyio.sleep(run.deadline_s - time.monotonic() + 0.05)
            assert [g async for g in run] == []
        assert run.stopped is not None
        assert run.stopped.done_reason is DoneReason.TIMEOUT
        assert_nothing_leaked(manager)
