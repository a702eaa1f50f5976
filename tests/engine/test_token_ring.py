"""The ring contract (engine/base.py), for the C ring and the Python twin alike."""

from __future__ import annotations

import os
import select
import signal
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.engine.base import TokenRing
from modeld.engine.pyring import PyTokenRing
from modeld.types import LoopKind
from tests.support.engine import wait_until

RingFactory = Callable[[int], TokenRing]


def _c_ring(capacity_bytes: int) -> TokenRing:
    from modeld.engine.select import token_loop

    return token_loop(LoopKind.C).new_ring(capacity_bytes)


@pytest.fixture(params=[LoopKind.C, LoopKind.PYTHON], ids=str)
def make_ring(request: pytest.FixtureRequest) -> Iterator[RingFactory]:
    """A factory for the C ring or the Python ring; closes what it made."""
    made: list[TokenRing] = []

    def make(capacity_bytes: int = 64) -> TokenRing:
        ring = (
            _c_ring(capacity_bytes) if request.param is LoopKind.C else PyTokenRing(capacity_bytes)
        )
        made.append(ring)
        return ring

    yield make
    for ring in made:
        ring.close()


def _readable(ring: TokenRing) -> bool:
    return bool(select.select([ring.fileno()], [], [], 0)[0])


def _is_full(ring: TokenRing) -> bool:
    """The producer is asleep on a full ring (white-box: neither ring has an event for it)."""
    if isinstance(ring, PyTokenRing):
        return len(ring._buffer) >= ring._capacity_bytes
    return bool(ring.producer_waiting)  # type: ignore[attr-defined]


def test_push_then_drain(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    assert ring.push(b"hello ", 1)
    assert ring.push(b"world", 2)
    assert ring.drain() == (b"hello world", 3, False)
    assert ring.drain() == (b"", 0, False)


def test_empty_push_still_counts_tokens(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    assert ring.push(b"", 1)  # a token whose bytes are held back (half a character)
    assert _readable(ring)
    assert ring.drain() == (b"", 1, False)


def test_fd_is_written_once_per_turn_to_non_empty(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    assert not _readable(ring)
    for _ in range(5):
        ring.push(b"x", 1)
    assert os.eventfd_read(ring.fileno()) == 1  # one wake-up for five pushes
    ring.drain()
    assert not _readable(ring)
    ring.push(b"y", 1)
    assert _readable(ring)
    assert ring.drain() == (b"y", 1, False)
    assert not _readable(ring)


def test_finish_wakes_and_reports_after_the_data(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    ring.push(b"tail", 1)
    ring.drain()
    ring.push(b"end", 1)
    ring.finish()
    ring.finish()  # idempotent
    assert _readable(ring)
    assert ring.drain() == (b"end", 1, True)
    assert ring.drain() == (b"", 0, True)


def test_after_watch_finish_only_the_finish_wakes(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    ring.push(b"a", 1)
    assert _readable(ring)
    assert ring.watch_finish() is False
    assert not _readable(ring)
    ring.push(b"b", 1)
    ring.push(b"c", 1)
    assert not _readable(ring)  # pushes stay quiet until the next drain
    ring.finish()
    assert _readable(ring)
    assert ring.drain() == (b"abc", 3, True)
    ring.push(b"", 0)  # after the drain, pushes wake again (the turn to non-empty)
    assert _readable(ring)


def test_watch_finish_reports_an_end_it_cleared(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    ring.push(b"last", 1)
    ring.finish()
    assert ring.watch_finish() is True  # its wake-up is gone, so it must say so
    assert not _readable(ring)
    assert ring.drain() == (b"last", 1, True)


def test_capacity_below_minimum_is_refused(make_ring: RingFactory) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        make_ring(15)


def test_push_after_cancel_returns_false(make_ring: RingFactory) -> None:
    ring = make_ring(64)
    ring.cancel()
    ring.cancel()
    assert ring.cancelled
    assert not ring.push(b"late", 1)
    assert ring.drain() == (b"", 0, False)


def test_full_ring_blocks_until_drained(make_ring: RingFactory) -> None:
    ring = make_ring(16)
    payload = bytes(range(100))
    pushed: list[bool] = []
    producer = threading.Thread(target=lambda: pushed.append(ring.push(payload, 7)))
    producer.start()
    received = bytearray()
    tokens = 0
    while len(received) < len(payload):
        wait_until(lambda: _is_full(ring) or not producer.is_alive())
        data, count, _ = ring.drain()
        assert len(data) <= 16
        received += data
        tokens += count
    producer.join()
    assert pushed == [True]
    assert (bytes(received), tokens) == (payload, 7)


def test_cancel_unblocks_a_waiting_producer(make_ring: RingFactory) -> None:
    ring = make_ring(16)
    pushed: list[bool] = []
    producer = threading.Thread(target=lambda: pushed.append(ring.push(b"z" * 64, 1)))
    producer.start()
    wait_until(lambda: _is_full(ring))
    ring.cancel()
    producer.join()
    assert pushed == [False]
    data, _, _ = ring.drain()
    assert data == b"z" * 16


class _Interrupted(Exception):
    pass


def test_a_blocked_push_runs_signal_handlers(make_ring: RingFactory) -> None:
    """A producer on the main thread stuck on a full ring still sees KeyboardInterrupt & co."""
    ring = make_ring(16)
    main = threading.get_ident()

    def handler(_signum: int, _frame: object) -> None:
        raise _Interrupted

    def interrupt_when_blocked() -> None:
        wait_until(lambda: _is_full(ring))
        signal.pthread_kill(main, signal.SIGUSR1)

    previous = signal.signal(signal.SIGUSR1, handler)
    interrupter = threading.Thread(target=interrupt_when_blocked)
    try:
        interrupter.start()
        with pytest.raises(_Interrupted):
            ring.push(b"s" * 64, 1)
    finally:
        interrupter.join()
        signal.signal(signal.SIGUSR1, previous)
    assert ring.drain()[0] == b"s" * 16  # what fitted before the interrupt stays pushed
    assert ring.push(b"after", 1)  # and the producer side is free again
    assert ring.drain() == (b"after", 1, False)


@settings(max_examples=200, deadline=None)
@given(
    capacity=st.integers(16, 64),
    steps=st.lists(st.one_of(st.binary(max_size=40), st.none()), max_size=60),
)
def test_wraparound_keeps_bytes_in_order(capacity: int, steps: list[bytes | None]) -> None:
    """Single-threaded model check of the C ring: pushes that fit, drains in between."""
    ring = _c_ring(capacity)
    expected = bytearray()
    buffered = 0
    received = bytearray()
    try:
        for step in steps:
            # a push into a full ring waits, even an empty one (it still carries a token)
            if step is None or buffered + max(len(step), 1) > capacity:
                data, _, _ = ring.drain()
                received += data
                buffered = 0
            if step is not None and len(step) <= capacity:
                assert ring.push(step, 1)
                expected += step
                buffered += len(step)
        received += ring.drain()[0]
    finally:
        ring.close()
    assert bytes(received) == bytes(expected)


# ------------------------------------------------------------------ C ring only


@pytest.fixture
def c_ring() -> Iterator[TokenRing]:
    ring = _c_ring(16)
    yield ring
    ring.cancel()
    ring.close()


def test_c_ring_refuses_a_second_producer(c_ring: TokenRing) -> None:
    producer = threading.Thread(target=lambda: c_ring.push(b"q" * 64, 1))
    producer.start()
    wait_until(lambda: _is_full(c_ring))
    with pytest.raises(RuntimeError, match="already has an active producer"):
        c_ring.push(b"x", 1)
    with pytest.raises(RuntimeError, match="while its producer runs"):
        c_ring.close()
    c_ring.cancel()
    producer.join()


def test_c_ring_rejects_negative_tokens(c_ring: TokenRing) -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        c_ring.push(b"x", -1)


def test_c_ring_closed_use_raises(c_ring: TokenRing) -> None:
    c_ring.close()
    c_ring.close()  # idempotent
    for call in (c_ring.fileno, c_ring.drain, c_ring.finish, lambda: c_ring.push(b"", 0)):
        with pytest.raises(ValueError, match="closed"):
            call()


def test_c_ring_capacity_bounds() -> None:
    with pytest.raises(ValueError, match="at most 1 GiB"):
        _c_ring(2**31)
    ring = _c_ring(16)
    assert ring.capacity_bytes == 16  # type: ignore[attr-defined]
    ring.close()


def test_a_loop_start_wakes_only_a_consumer_that_asked(make_ring: RingFactory) -> None:
    quiet, asked = make_ring(64), make_ring(64)
    asked.wake_at_start()
    for ring in (quiet, asked):
        ring.loop_started()
    assert not _readable(quiet)  # a choice's loop, a warm-up: no wake for nothing
    assert _readable(asked)
    assert asked.drain() == (b"", 0, False)  # a wake, not data
    assert not _readable(asked)
    asked.loop_started()  # once per asking
    assert not _readable(asked)
