"""Lifecycle events (load started, ready, evicted, error) fanned out to subscribers.

Each subscriber gets a bounded buffer; a subscriber that does not keep up loses the
oldest events rather than holding memory or slowing the scheduler.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import anyio

__all__ = ["Event", "EventHub", "Subscription"]


@dataclass(frozen=True, slots=True)
class Event:
    kind: str
    data: dict[str, object]
    time_unix: float = field(default_factory=time.time)


class Subscription:
    def __init__(self, capacity: int) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._arrived = anyio.Event()

    def _offer(self, event: Event) -> None:
        self._events.append(event)  # a full deque drops its oldest event
        self._arrived.set()

    async def next(self) -> Event:
        while not self._events:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self._events.popleft()


Listener = Callable[[Event], None]


class EventHub:
    """Publish from the event loop's thread; subscribe from any task.

    Listeners (metrics, logs) are called synchronously on publish and must not block;
    subscribers (``GET /events``) read at their own pace from a bounded buffer.
    """

    def __init__(self, capacity_per_subscriber: int = 256) -> None:
        self._capacity = capacity_per_subscriber
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def publish(self, kind: str, **data: object) -> None:
        event = Event(kind, dict(data))
        for listener in self._listeners:
            listener(event)
        for subscriber in self._subscribers:
            subscriber._offer(event)

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        subscription = Subscription(self._capacity)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)
