"""The clock that keep-alive expiry runs on, injected so that tests can move time.

The scheduler asks a :class:`Clock` what time it is and for a cancel scope that fires at
a given time; :class:`MonotonicClock` is the real one (``time.monotonic`` and the event
loop's own deadlines). A test passes a clock it advances by hand, so that "five minutes
idle" takes no five minutes and no sleep.
"""

from __future__ import annotations

import math
import time
from typing import Protocol

import anyio

__all__ = ["Clock", "MonotonicClock"]


class Clock(Protocol):
    def now_s(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""
        ...

    def cancel_at(self, deadline_s: float) -> anyio.CancelScope:
        """A cancel scope that is cancelled once :meth:`now_s` reaches ``deadline_s``
        (``math.inf``: never). Enter it on the event loop's thread."""
        ...


class MonotonicClock:
    """``time.monotonic`` (the scale asyncio's and trio's deadlines use on Linux)."""

    def now_s(self) -> float:
        return time.monotonic()

    def cancel_at(self, deadline_s: float) -> anyio.CancelScope:
        if math.isinf(deadline_s):
            return anyio.CancelScope()
        return anyio.move_on_after(max(0.0, deadline_s - time.monotonic()))
