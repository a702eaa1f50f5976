"""The adaptive coalescing window: what it holds, and what it never holds.

The pure :class:`Coalescer` is driven with explicit times. The :class:`Generation` tests
run a real ring (C and Python) fed by a producer on a real worker thread that the test
steps token by token, so "not held" is shown by a chunk arriving while the producer waits
for the test, never by a timing.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import anyio
import pytest

from modeld.engine.base import LoopOutcome, StopCode, TokenLoop, TokenRing
from modeld.engine.worker import EngineWorker
from modeld.scheduling.coalescing import WHOLE_ANSWER_GAP_S, Coalescer
from modeld.scheduling.generation import Generation, RequestTiming
from modeld.types import Chunk, DoneReason

HOUR_S = 3600.0
HANG_GUARD_S = 60.0  # far below an hour: only a wake-up by an event gets under it
GAP_S = 0.05


def sent(coalescer: Coalescer, *times_and_tokens: tuple[float, int]) -> Coalescer:
    for now_s, tokens in times_and_tokens:
        coalescer.chunk_sent(now_s, tokens)
    return coalescer


def test_the_first_two_chunks_are_never_held() -> None:
    coalescer = Coalescer(GAP_S)
    assert coalescer.hold_s(0.0) == 0.0  # before the first chunk
    sent(coalescer, (1.0, 1))
    assert coalescer.hold_s(1.0001) == 0.0  # no rate known after one chunk


def test_fast_tokens_are_held_until_the_gap_bound_and_no_longer() -> None:
    coalescer = sent(Coalescer(GAP_S), (1.0, 1), (1.01, 1))  # 10 ms a token
    assert coalescer.seconds_per_token == pytest.approx(0.01)
    assert coalescer.hold_s(1.02) == pytest.approx(GAP_S - 0.01)
    assert coalescer.hold_s(1.01 + GAP_S) == 0.0
    assert coalescer.hold_s(1.01 + 2 * GAP_S) == 0.0  # late already: take at once


def test_tokens_slower_than_two_per_gap_are_taken_as_they_come() -> None:
    coalescer = sent(Coalescer(GAP_S), (1.0, 1), (1.03, 1))  # 30 ms a token
    assert coalescer.hold_s(1.031) == 0.0


def test_the_window_follows_the_rate_both_ways() -> None:
    coalescer = sent(Coalescer(GAP_S), (1.0, 1), (1.01, 1))
    assert coalescer.hold_s(1.011) > 0
    sent(coalescer, (1.2, 1), (1.4, 1))  # the model slowed down (another model runs)
    assert coalescer.hold_s(1.401) == 0.0
    sent(coalescer, (1.41, 5), (1.42, 5), (1.43, 5))  # and sped up again
    assert coalescer.hold_s(1.431) > 0


def test_a_zero_gap_never_holds() -> None:
    coalescer = sent(Coalescer(0.0), (1.0, 1), (1.001, 10), (1.002, 10))
    assert coalescer.hold_s(1.0021) == 0.0


def test_a_whole_answer_reader_allows_longer_gaps() -> None:
    coalescer = sent(Coalescer(GAP_S), (1.0, 1), (1.03, 1))  # too slow for 50 ms
    assert coalescer.hold_s(1.031) == 0.0
    coalescer.read_whole()
    assert coalescer.max_gap_s == WHOLE_ANSWER_GAP_S
    assert coalescer.hold_s(1.031) == pytest.approx(1.03 + WHOLE_ANSWER_GAP_S - 1.031)


def test_a_negative_gap_is_refused() -> None:
    with pytest.raises(ValueError, match="max_gap_s"):
        Coalescer(-0.001)


class SteppedProducer:
    """Pushes one token per step the test allows, on a real worker thread."""

    def __init__(self, ring: TokenRing) -> None:
        self.ring = ring
        self._steps = threading.Semaphore(0)
        self.tokens = 0

    def allow(self, tokens: int = 1) -> None:
        for _ in range(tokens):
            self._steps.release()

    def run(self, total_tokens: int) -> LoopOutcome:
        stop = StopCode.LENGTH
        for _ in range(total_tokens):
            self._steps.acquire()
            if not self.ring.push(b"tok ", 1):
                stop = StopCode.CANCELLED
                break
            self.tokens += 1
        self.ring.finish()
        return LoopOutcome(stop, 1, self.tokens, 0.0, 0.0)


@pytest.fixture
def ring(token_loop: TokenLoop) -> Iterator[TokenRing]:
    ring = token_loop.new_ring()
    yield ring
    ring.cancel()


async def stepped_generation(
    ring: TokenRing, total_tokens: int, max_gap_s: float
) -> tuple[Generation, SteppedProducer, EngineWorker]:
    producer = SteppedProducer(ring)
    worker = EngineWorker("coalescer-test")
    call = worker.submit(lambda: producer.run(total_tokens))
    generation = Generation(
        request_id="r1",
        model_id="m",
        ring=ring,
        call=call,
        timing=RequestTiming(),
        deadline_s=None,
        on_finished=lambda _: None,
        max_gap_s=max_gap_s,
    )
    return generation, producer, worker


async def next_chunk(generation: Generation) -> Chunk:
    with anyio.fail_after(HANG_GUARD_S):
        return await generation.__anext__()


@pytest.mark.anyio
async def test_the_first_chunk_is_not_held(ring: TokenRing) -> None:
    generation, producer, worker = await stepped_generation(ring, 3, HOUR_S)
    producer.allow()  # one token; the producer then waits for the test
    assert (await next_chunk(generation)).tokens == 1
    producer.allow()
    assert (await next_chunk(generation)).tokens == 1  # no rate known yet: not held
    producer.allow()
    assert (await next_chunk(generation)).tokens == 1  # the end woke the hour-long hold
    with pytest.raises(StopAsyncIteration):
        await next_chunk(generation)
    assert generation.result is not None
    assert generation.result.done_reason is DoneReason.LENGTH
    await worker.shutdown()


@pytest.mark.anyio
async def test_the_terminal_line_is_not_held(ring: TokenRing) -> None:
    """Fast tokens set an hour-long hold; the end arrives inside it and is seen at once."""
    generation, producer, worker = await stepped_generation(ring, 40, HOUR_S)
    producer.allow(2)
    seen = 0
    while seen < 2:
        seen += (await next_chunk(generation)).tokens
    producer.allow(38)  # fast, then the producer finishes inside the hold
    with anyio.fail_after(HANG_GUARD_S):
        rest = [chunk async for chunk in generation]
    assert seen + sum(chunk.tokens for chunk in rest) == 40
    assert generation.result is not None
    assert generation.result.done_reason is DoneReason.LENGTH
    await worker.shutdown()


@pytest.mark.anyio
async def test_held_tokens_come_out_at_the_gap_bound_without_the_end(ring: TokenRing) -> None:
    """Tokens come fast, then the producer stalls (it waits for the test): what the
    hold gathered still comes out, bounded by the gap and not by the next event."""
    generation, producer, worker = await stepped_generation(ring, 60, GAP_S)
    producer.allow(30)
    got = 0
    while got < 30:  # nothing more comes and the stream does not end: only the bound ends a hold
        got += (await next_chunk(generation)).tokens
    assert got == 30
    assert generation.result is None  # the producer still waits: the stream has not ended
    producer.allow(30)
    with anyio.fail_after(HANG_GUARD_S):
        rest = [chunk async for chunk in generation]
    assert got + sum(chunk.tokens for chunk in rest) == 60
    await worker.shutdown()


@pytest.mark.anyio
async def test_a_cancel_inside_an_hour_long_hold_ends_the_stream(ring: TokenRing) -> None:
    generation, producer, worker = await stepped_generation(ring, 10, HOUR_S)
    producer.allow(3)
    seen = 0
    while seen < 3:
        seen += (await next_chunk(generation)).tokens

    async def cancel_soon() -> None:
        await anyio.sleep(0.01)  # the consumer is in its hold by now
        generation.cancel()
        producer.allow(7)  # the producer's next push sees the cancel

    with anyio.fail_after(HANG_GUARD_S):
        async with anyio.create_task_group() as group:
            group.start_soon(cancel_soon)
            async for _chunk in generation:
                pass
    assert generation.result is not None
    assert generation.result.done_reason is DoneReason.CANCELLED
    await worker.shutdown()
