"""The memory budget and the choice of eviction victims: pure, no I/O, no clock."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from modeld.sizes import MIB

__all__ = ["Candidate", "MemoryBudget", "choose_victims"]


@dataclass(frozen=True, slots=True)
class Candidate:
    """What eviction needs to know about one instance."""

    model_id: str
    bytes: int
    last_used_s: float
    evictable: bool  # ready, idle (nothing running or queued) and not pinned


class MemoryBudget:
    """Per-instance charges against ``budget - margin``; every byte is owned by one id."""

    def __init__(self, budget_mb: int, margin_mb: int) -> None:
        if margin_mb < 0 or budget_mb <= 0:
            raise ValueError("budget must be positive and margin non-negative")
        self.budget_mb = budget_mb
        self.margin_mb = margin_mb
        self._charges: dict[str, int] = {}
        # Memory that gives way to models (the prompt cache): not charged here, it lives
        # in what the charges leave free and is told to shrink to it on every charge.
        self._give_way: Callable[[int], object] | None = None

    def give_way_with(self, shrink_to: Callable[[int], object]) -> None:
        """Call ``shrink_to(free bytes)`` whenever a charge changes."""
        self._give_way = shrink_to

    @property
    def limit_bytes(self) -> int:
        return max(0, (self.budget_mb - self.margin_mb) * MIB)

    @property
    def used_bytes(self) -> int:
        # list(): one C-level copy, so a worker thread (the prompt cache asks how much
        # is free) never iterates while the event loop changes a charge
        return sum(list(self._charges.values()))

    @property
    def free_bytes(self) -> int:
        return max(0, self.limit_bytes - self.used_bytes)

    def charge_of(self, model_id: str) -> int:
        return self._charges.get(model_id, 0)

    def fits(self, new_bytes: int) -> bool:
        return self.used_bytes + new_bytes <= self.limit_bytes

    def could_ever_fit(self, new_bytes: int) -> bool:
        return new_bytes <= self.limit_bytes

    def charge(self, model_id: str, nbytes: int) -> None:
        """Set ``model_id``'s charge (a reservation before load, the measurement after)."""
        self._charges[model_id] = max(0, nbytes)
        if self._give_way is not None:
            self._give_way(self.free_bytes)

    def release(self, model_id: str) -> None:
        self._charges.pop(model_id, None)


def choose_victims(
    candidates: Iterable[Candidate], need_bytes: int, used_bytes: int, limit_bytes: int
) -> list[str] | None:
    """Least-recently-used evictable instances whose release makes ``need_bytes`` fit.

    Returns ``[]`` when it fits already, ``None`` when evicting every evictable instance
    would still not be enough (the caller then waits for busy ones, or refuses).
    """
    if used_bytes + need_bytes <= limit_bytes:
        return []
    victims: list[str] = []
    freed = 0
    for candidate in sorted(
        (c for c in candidates if c.evictable), key=lambda c: (c.last_used_s, c.model_id)
    ):
        victims.append(candidate.model_id)
        freed += candidate.bytes
        if used_bytes - freed + need_bytes <= limit_bytes:
            return victims
    return None
