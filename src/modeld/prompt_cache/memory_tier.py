"""The prompt cache's memory tier: sequence states in host memory, LRU within a bound.

Its room is the smaller of its own bound and what the memory budget leaves free
(``room``): when a model needs that memory, :meth:`MemoryTier.shrink_to` drops cache
entries first, so the cache never keeps a model from loading. Thread-safe: workers put
and take entries while the event loop's charges shrink it.

States waiting for the disk writer are *pinned* here (:meth:`MemoryTier.pin`): a pending
payload the tier no longer holds as an entry still counts against its bound (the
setting: entries and pins together never pass it), so the bound covers every state copy
the cache keeps alive. A pin cannot be given way (it lasts
one file write, milliseconds); everything else can.
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
        self._pinned: dict[tuple[str, tuple[int, ...]], int] = {}  # pending disk writes
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

    @property
    def pinned_bytes(self) -> int:
        """Bytes of states waiting for the disk writer (held as entries or not)."""
        with self._lock:
            return sum(self._pinned.values())

    @property
    def held_bytes(self) -> int:
        """What the bound covers: the entries and the pinned states that are not one."""
        with self._lock:
            return self._bytes + self._unshared_pins()

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
            if size + self._all_pins(entry.key) > allowed:  # even with every entry gone
                return False
            self._evict_until(allowed - size, entry.key)
            self._entries[entry.key] = entry
            self._bytes += size
            return True

    def pin(self, key: tuple[str, tuple[int, ...]], size_bytes: int) -> bool:
        """Count a state the disk writer holds against the bound until :meth:`unpin`;
        evicts least recently used entries for it. False when it cannot fit.

        The limit is the bound itself, not the budget's free memory: a model being
        evicted saves its state while the model that displaces it waits for that memory,
        and its state must still reach the disk. The bound covers it either way."""
        with self._lock:
            if key in self._pinned:
                return False
            if key not in self._entries:
                if size_bytes + self._all_pins() > self.bound_bytes:
                    return False
                self._evict_until(self.bound_bytes - size_bytes)
            self._pinned[key] = size_bytes
            return True

    def unpin(self, key: tuple[str, tuple[int, ...]]) -> None:
        with self._lock:
            self._pinned.pop(key, None)

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

    def _all_pins(self, ignore: tuple[str, tuple[int, ...]] | None = None) -> int:
        return sum(size for key, size in self._pinned.items() if key != ignore)

    def _unshared_pins(self, ignore: tuple[str, tuple[int, ...]] | None = None) -> int:
        return sum(
            size for key, size in self._pinned.items() if key != ignore and key not in self._entries
        )

    def _evict_until(
        self, limit_bytes: int, ignore: tuple[str, tuple[int, ...]] | None = None
    ) -> int:
        """Drop least recently used entries until the entries and the pins (but the one
        ``ignore`` names: it is about to become an entry) fit ``limit_bytes``."""
        dropped = 0
        while self._entries and self._bytes + self._unshared_pins(ignore) > limit_bytes:
            _, entry = self._entries.popitem(last=False)
            self._bytes -= len(entry.payload)
            dropped += len(entry.payload)
        return dropped
