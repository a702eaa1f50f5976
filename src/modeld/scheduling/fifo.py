"""A single-holder slot with a FIFO of waiters: one in-flight generation per instance."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio

__all__ = ["FifoSlot", "SlotTicket"]


class FifoSlot:
    """Hands the slot to waiters strictly in arrival order.

    :meth:`join` takes a place in line without awaiting, so the order of arrival is the
    order of the calls, whatever the caller awaits before it needs the slot. The ticket
    it returns is the one thing to release, whether it still waits or already holds.
    """

    def __init__(self, on_idle: Callable[[], None] | None = None) -> None:
        self._busy = False
        self._waiters: deque[anyio.Event] = deque()
        self._on_idle = on_idle  # called each time the slot goes from held to idle

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def queue_len(self) -> int:
        return len(self._waiters)

    @property
    def idle(self) -> bool:
        return not self._busy and not self._waiters

    def join(self) -> SlotTicket:
        """A place in line: the slot itself if it is free, else the end of the queue."""
        granted = anyio.Event()
        if self.idle:
            self._busy = True
            granted.set()
        else:
            self._waiters.append(granted)
        return SlotTicket(self, granted)

    def _leave(self, granted: anyio.Event) -> None:
        if granted.is_set():
            self._pass_on()  # held, or handed over at the moment its holder left
        else:
            self._waiters.remove(granted)

    def _pass_on(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # ownership moves; the slot stays busy
        else:
            self._busy = False
            if self._on_idle is not None:
                self._on_idle()


class SlotTicket:
    """One caller's claim on a :class:`FifoSlot`, waiting or holding; released once.

    Made without an await, it is owned before the first await that could be cancelled:
    the caller wraps everything after :meth:`FifoSlot.join` in ``try``/``except`` and
    calls :meth:`release` on the way out.
    """

    def __init__(self, slot: FifoSlot, granted: anyio.Event) -> None:
        self._slot = slot
        self._granted = granted
        self._claimed = True

    async def wait(self, timeout_s: float | None = None) -> None:
        """Until the slot is this ticket's. Raises ``TimeoutError`` after ``timeout_s``;
        on any exception the ticket is still to be released by its owner."""
        with anyio.fail_after(timeout_s):
            await self._granted.wait()

    def release(self) -> None:
        """Give up the place in line or the slot. Idempotent."""
        if self._claimed:
            self._claimed = False
            self._slot._leave(self._granted)

    def release_when(self, on_done: Callable[[Callable[[], None]], None]) -> None:
        """Hand the release to ``on_done``, which calls its argument once, later or now:
        the holder leaves while work it started (a tokenization on the model's worker)
        is still running, and the model must stay busy until that work ends."""
        if self._claimed:
            self._claimed = False
            on_done(lambda: self._slot._leave(self._granted))
