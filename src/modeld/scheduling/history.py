"""The last few lifecycle events (loads, evictions and why, errors), kept for ``/status``
so that a status page opened now, or reconnected after a restart, shows what just
happened and not only what happens next."""

from __future__ import annotations

from collections import deque

import msgspec

from modeld.events import Event, ModelEvent, ModelLoadingProgress, PromptCacheRestored
from modeld.statistics import RecentEvent

__all__ = ["EventHistory"]

DEFAULT_CAPACITY = 50


class EventHistory:
    """An :class:`~modeld.events.EventHub` listener holding the newest
    ``capacity`` model events; per-stage load progress is left out (the instance's
    ``load_stage`` shows where a load is), and so are prompt-cache restores (one per
    request at most, they would push the loads and evictions out; ``/metrics`` counts
    them)."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._events: deque[RecentEvent] = deque(maxlen=capacity)

    def __call__(self, event: Event) -> None:
        if not isinstance(event, ModelEvent) or isinstance(
            event, ModelLoadingProgress | PromptCacheRestored
        ):
            return
        fields = event.fields()
        del fields["model"]
        details = msgspec.to_builtins(fields)
        self._events.append(RecentEvent(event.kind, event.time_unix, event.model, details))

    def statistics(self) -> tuple[RecentEvent, ...]:
        """Oldest first."""
        return tuple(self._events)
