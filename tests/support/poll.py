"""The one poller of the test suite: wait for a state that has no event to wait on (a
server's port, a replica's report, a generation that is running).

Bounded by time, never by a count of tries, so that a slow or busy machine gets the same
wait in seconds as a fast one; the bound is generous (a test asserts the state is
reached, not how fast).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["poll"]

T = TypeVar("T")


def poll(
    probe: Callable[[], T],
    done: Callable[[T], bool] = bool,
    *,
    timeout_s: float = 30.0,
    every_s: float = 0.025,
    retry_on: tuple[type[BaseException], ...] = (),
    what: str = "condition",
) -> T:
    """Call ``probe`` until ``done(value)``; that value. An exception in ``retry_on``
    counts as "not yet". Fails with the last value (or error) after ``timeout_s``."""
    deadline_s = time.monotonic() + timeout_s
    while True:
        try:
            value = probe()
        except retry_on as exc:
            last: object = exc
        else:
            if done(value):
                return value
            last = value
        if time.monotonic() >= deadline_s:
            raise AssertionError(f"{what} never met within {timeout_s:g} s; last: {last!r}")
        time.sleep(every_s)  # a polling interval, not a synchronisation
