"""The prompt cache's memory tier: sequence states in host memory, LRU within a bound.

Its room is the smaller of its own bound and what the memory budget leaves free
(``room``): when a model needs that memory, :meth:`MemoryTier.shrink_to` drops cache
entries first, so the cache never keeps a model from loading. Thread-safe: workers put
and take entries while the event loop's charges shrink it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["MemoryEntry", "MemoryTier"]


@dataclass(frozen=True, slots=True)
class MemoryEntry:
    namespace_digest: str
    tokens: tuple[int, ...]
    payload: bytes

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return (self.namespace_digest, self.tokens)


class MemoryTier:
    def __init__(self, bound_bytes: int, room: Callable[[], int] | None = None) -> None:
        self.bound_bytes = bound_bytes
        self._room = room
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], MemoryEntry] = OrderedDict()
        self._bytes = 0
        self.given_way_bytes = 0  # dropped to make room for a model (a counter)

    @property
    def in_budget(self) -> bool:
        return self._room is not None

    @property
    def used_bytes(self) -> int:
        return self._bytes

    @property
    def count(self) -> int:
        return len(self._entries)

    def allowed_bytes(self) -> int:
        room = self._room() if self._room is not None else self.bound_bytes
        return max(0, min(self.bound_bytes, room))

    def entries(self, namespace_digest: str) -> list[MemoryEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.namespace_digest == namespace_digest]

    def touch(self, entry: MemoryEntry) -> bool:
        """Mark ``entry`` most recently used; False when it is gone."""
        with self._lock:
            if entry.key not in self._entries:
                return False
            self._entries.move_to_end(entry.key)
            return True

    def put(self, entry: MemoryEntry) -> bool:
        """Keep ``entry``, evicting least recently used ones; False when it cannot fit."""
        size = len(entry.payload)
        with self._lock:
            old = self._entries.pop(entry.key, None)
            if old is not None:
                self._bytes -= len(old.payload)
            allowed = self.allowed_bytes()
            if size > allowed:
                return False
            self._evict_until(allowed - size)
            self._entries[entry.key] = entry
            self._bytes += size
            return True

    def remove(self, entry: MemoryEntry) -> None:
        with self._lock:
            if self._entries.pop(entry.key, None) is not None:
                self._bytes -= len(entry.payload)

    def shrink_to(self, limit_bytes: int) -> int:
        """Drop least recently used entries until at most ``limit_bytes`` are held;
        returns the bytes dropped."""
        with self._lock:
            dropped = self._evict_until(max(0, limit_bytes))
            self.given_way_bytes += dropped
            return dropped

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _evict_until(self, limit_bytes: int) -> int:
        dropped = 0
        while self._entries and self._bytes > limit_bytes:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry.payload)
            dropped += len(entry.payload)
        return dropped
