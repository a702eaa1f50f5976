"""A single-holder slot with a FIFO of waiters: one in-flight generation per instance."""

from __future__ import annotations

from collections import deque

import anyio

__all__ = ["FifoSlot"]


class FifoSlot:
    """Hands the slot to waiters strictly in arrival order.

    A waiter that is cancelled or times out is removed in ``finally``; one that was handed
    the slot at the same moment passes it straight on, so the slot is never lost.
    """

    def __init__(self) -> None:
        self._busy = False
        self._waiters: deque[anyio.Event] = deque()

    @property
    def busy(self) -> bool:
        return self._busy

    @property
    def queue_len(self) -> int:
        return len(self._waiters)

    async def acquire(self, timeout_s: float | None = None) -> None:
        """Wait for the slot. Raises ``TimeoutError`` after ``timeout_s``.

        On return the caller owns the slot and must release it; on any exception
        (cancellation included) it owns nothing.
        """
        if not self._busy and not self._waiters:
            # Cancellation is delivered before the slot is taken, never after: taking it
            # and then awaiting would leave a slot that nobody releases.
            await anyio.lowlevel.checkpoint_if_cancelled()
            self._busy = True
            await anyio.lowlevel.cancel_shielded_checkpoint()
            return
        handed_over = anyio.Event()
        self._waiters.append(handed_over)
        try:
            with anyio.fail_after(timeout_s):
                await handed_over.wait()
        except BaseException:
            if handed_over.is_set():
                self.release()
            else:
                self._waiters.remove(handed_over)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # ownership moves; the slot stays busy
        else:
            self._busy = False
