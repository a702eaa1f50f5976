"""A clock that moves only when a test moves it: keep-alive without waiting."""

from __future__ import annotations

import math

import anyio

__all__ = ["ManualClock"]


class ManualClock:
    """:class:`modeld.scheduling.clock.Clock` whose time is advanced by hand.

    Use it on the event loop's thread (through a blocking portal's ``call`` from a
    hypothesis machine): :meth:`advance` cancels the scopes whose deadline it passes, as
    the real clock's deadlines would fire.
    """

    def __init__(self, start_s: float = 1_000.0) -> None:
        self._now_s = start_s
        self._pending: list[tuple[float, anyio.CancelScope]] = []

    def now_s(self) -> float:
        return self._now_s

    def cancel_at(self, deadline_s: float) -> anyio.CancelScope:
        scope = anyio.CancelScope()
        if deadline_s <= self._now_s:
            scope.cancel()
        elif not math.isinf(deadline_s):
            self._pending = [(d, s) for d, s in self._pending if not s.cancel_called]
            self._pending.append((deadline_s, scope))
        return scope

    def advance(self, seconds: float) -> None:
        self._now_s += seconds
        due = [scope for deadline_s, scope in self._pending if deadline_s <= self._now_s]
        self._pending = [(d, s) for d, s in self._pending if d > self._now_s]
        for scope in due:
            scope.cancel()
