"""Lifecycle events (load started, progress, ready, evicted, error, a prompt-cache restore,
generation finished) fanned out to listeners and subscribers.

Each event is a small frozen type; its ``kind`` is the wire name (the SSE ``event:`` and
the log message). Each subscriber gets a bounded buffer; a subscriber that does not keep
up loses the oldest events rather than holding memory or slowing the scheduler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import ClassVar

import anyio

from modeld.types import DoneReason, GenerationResult

__all__ = [
    "Event",
    "EventHub",
    "GenerationFinished",
    "ModelEvent",
    "ModelEvicted",
    "ModelFailed",
    "ModelLoadStarted",
    "ModelLoadingProgress",
    "ModelReady",
    "PromptCacheRestored",
    "Subscription",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    kind: ClassVar[str]
    time_unix: float = field(default_factory=time.time)

    def fields(self) -> dict[str, object]:
        """The event's own fields (not ``time_unix``), for a log line or an SSE body."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "time_unix"
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEvent(Event):
    """An instance's lifecycle: what ``GET /events`` streams."""

    model: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelLoadStarted(ModelEvent):
    kind: ClassVar[str] = "model_load_started"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelLoadingProgress(ModelEvent):
    kind: ClassVar[str] = "model_loading_progress"
    stage: str
    progress: float


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelReady(ModelEvent):
    kind: ClassVar[str] = "model_ready"
    load_ms: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelEvicted(ModelEvent):
    kind: ClassVar[str] = "model_evicted"
    reason: DoneReason  # what its running stream's terminal line says
    cause: str = "evicted"  # why: unload, budget (to make room for_model), shutdown, ...
    for_model: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelFailed(ModelEvent):
    kind: ClassVar[str] = "model_error"
    error: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PromptCacheRestored(ModelEvent):
    """A prompt's prefix came back from the prompt cache instead of being evaluated:
    which tier served it, how many tokens and MiB, and how long the copy took."""

    kind: ClassVar[str] = "prompt_cache_restored"
    tier: str  # "memory" or "disk"
    tokens: int
    mib: float
    ms: float


@dataclass(frozen=True, slots=True, kw_only=True)
class GenerationFinished(Event):
    kind: ClassVar[str] = "generation_finished"
    result: GenerationResult


class Subscription:
    def __init__(self, capacity: int) -> None:
        self._events: deque[Event] = deque(maxlen=capacity)
        self._arrived = anyio.Event()
        self._closed = False

    def _offer(self, event: Event) -> None:
        self._events.append(event)  # a full deque drops its oldest event
        self._arrived.set()

    def _close(self) -> None:
        self._closed = True
        self._arrived.set()

    async def next(self) -> Event | None:
        """The next event; None once the hub is closed and nothing is left."""
        while not self._events:
            if self._closed:
                return None
            self._arrived = anyio.Event()
            await self._arrived.wait()
        return self._events.popleft()


Listener = Callable[[Event], None]


class EventHub:
    """Publish from the event loop's thread; subscribe from any task.

    Listeners are called on publish and must not block: synchronously, or (``soon``)
    once the event loop is done with what it is doing; subscribers (``GET /events``)
    read at their own pace from a bounded buffer.
    """

    def __init__(self, capacity_per_subscriber: int = 256) -> None:
        self._capacity = capacity_per_subscriber
        self._subscribers: set[Subscription] = set()
        self._listeners: list[Listener] = []
        self._soon: list[Listener] = []
        self._closed = False

    def add_listener(self, listener: Listener, *, soon: bool = False) -> None:
        """``soon``: for work nobody waits for (a log line, metrics): called in order,
        right after what published the event (a generation's end) has let the event
        loop go, so that a request's last line is not written after it. On asyncio;
        elsewhere (and outside an event loop) at once."""
        (self._soon if soon else self._listeners).append(listener)

    def publish(self, event: Event) -> None:
        for listener in self._listeners:
            listener(event)
        if self._soon:
            _call_soon(lambda: self._call(self._soon, event))
        for subscriber in self._subscribers:
            subscriber._offer(event)

    @staticmethod
    def _call(listeners: list[Listener], event: Event) -> None:
        for listener in listeners:
            listener(event)

    def close(self) -> None:
        """End every subscription (at shutdown): each reads what is left, then None."""
        self._closed = True
        for subscriber in self._subscribers:
            subscriber._close()

    @asynccontextmanager
    async def subscribe(self) -> AsyncIterator[Subscription]:
        subscription = Subscription(self._capacity)
        if self._closed:
            subscription._close()
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)


def _call_soon(callback: Callable[[], None]) -> None:
    """``callback`` on the running asyncio loop's next turn; at once without one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # trio, or no event loop
        callback()
        return
    loop.call_soon(callback)
