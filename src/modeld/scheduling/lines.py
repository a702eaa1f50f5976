"""Per model, outliving its instances: the FIFO line of its requests, its counters, and
the backoff after a failed load.

Everything here runs on the event loop.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from modeld.errors import (
    MemoryBusy,
    ModelCoolingDown,
    ModeldError,
    QueueTimeout,
    ResourcesExhausted,
)
from modeld.scheduling.fifo import FifoSlot
from modeld.scheduling.instance import ModelCounters
from modeld.statistics import CounterStatistics, InstanceStatistics
from modeld.types import InstanceState

__all__ = ["BACKOFF_BASE_S", "BACKOFF_MAX_S", "ModelLines"]

BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0


class ModelLines:
    """One FIFO slot and one :class:`ModelCounters` per model id ever asked for.

    ``loaded(model_id)`` says whether the model has an instance now; ``on_idle`` is
    called with the model id each time its slot goes idle.
    """

    def __init__(self, loaded: Callable[[str], bool], on_idle: Callable[[str], None]) -> None:
        self._loaded = loaded
        self._on_idle = on_idle
        self._slots: dict[str, FifoSlot] = {}
        self.counters: dict[str, ModelCounters] = {}

    def slot_for(self, model_id: str) -> FifoSlot:
        """One FIFO per model, outliving its instances."""
        slot = self._slots.get(model_id)
        if slot is None:
            slot = self._slots[model_id] = FifoSlot(on_idle=lambda: self._on_idle(model_id))
        return slot

    def forget_slot_if_unused(self, model_id: str) -> None:
        """Drop an idle line for a model that has never been loaded (an id that turned
        out unknown): ids a client makes up must not grow the table."""
        slot = self._slots.get(model_id)
        unknown = not self._loaded(model_id) and model_id not in self.counters
        if slot is not None and slot.idle and unknown:
            del self._slots[model_id]

    def counters_for(self, model_id: str) -> ModelCounters:
        """Raises :class:`ModelCoolingDown` while a failed load's backoff runs."""
        counters = self.counters.setdefault(model_id, ModelCounters())
        now_s = time.monotonic()
        if counters.retry_at_s > now_s:
            raise ModelCoolingDown(
                f"{model_id}: loading failed ({counters.last_error}); retrying is allowed in "
                f"{counters.retry_at_s - now_s:.1f} s",
                retry_after_s=math.ceil(counters.retry_at_s - now_s),
            )
        return counters

    @staticmethod
    def loaded_ok(counters: ModelCounters) -> None:
        counters.loads_total += 1
        counters.consecutive_failures = 0
        counters.retry_at_s = 0.0

    @staticmethod
    def load_failed(counters: ModelCounters, error: ModeldError) -> None:
        """Count the failure; one that is the file's doing (not a passing shortage of
        memory, time or descriptors) backs off exponentially before the next try."""
        counters.load_failures_total += 1
        counters.last_error = error.message
        if not isinstance(error, MemoryBusy | QueueTimeout | ResourcesExhausted):
            counters.consecutive_failures += 1
            backoff_s = min(
                BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (counters.consecutive_failures - 1)
            )
            counters.retry_at_s = time.monotonic() + backoff_s

    def statistics(self) -> tuple[CounterStatistics, ...]:
        """Every model's totals, by id."""
        return tuple(
            CounterStatistics(
                model_id=model_id,
                loads_total=counts.loads_total,
                load_failures_total=counts.load_failures_total,
                evictions_total=counts.evictions_total,
            )
            for model_id, counts in sorted(self.counters.items())
        )

    def cooling_down(self, now_s: float) -> list[InstanceStatistics]:
        """Models with no instance whose last load failed: shown as ``error`` with the
        error and the time left before a retry, so the cooldown is visible."""
        return [
            InstanceStatistics(
                model_id=model_id,
                state=InstanceState.ERROR,
                last_used_unix=0.0,
                est_vram_mb=0.0,
                measured=False,
                queue_len=self.slot_for(model_id).queue_len,
                inflight=0,
                loads_total=counters.loads_total,
                evictions_total=counters.evictions_total,
                last_error=counters.last_error,
                uptime_seconds=0.0,
                pinned=False,
                retry_in_seconds=round(counters.retry_at_s - now_s, 3),
            )
            for model_id, counters in self.counters.items()
            if not self._loaded(model_id) and counters.retry_at_s > now_s
        ]
