"""One loaded (or loading) model: its state machine, its slot and its counters."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import anyio

from modeld.errors import ModeldError
from modeld.registry import ModelFile
from modeld.scheduling.fifo import FifoSlot
from modeld.scheduling.threads import ThreadShare
from modeld.sizes import MIB
from modeld.statistics import InstanceStatistics
from modeld.types import InstanceState

if TYPE_CHECKING:
    from modeld.engine.contract import Engine
    from modeld.engine.worker import EngineWorker
    from modeld.scheduling.choices import ChoiceRun

__all__ = ["IllegalTransition", "Instance", "ModelCounters"]

_ALLOWED = {
    InstanceState.LOADING: {InstanceState.READY, InstanceState.ERROR},
    InstanceState.READY: {InstanceState.UNLOADING},
    InstanceState.ERROR: {InstanceState.LOADING, InstanceState.UNLOADING},
    InstanceState.UNLOADING: set(),
}


class IllegalTransition(RuntimeError):
    pass


@dataclass
class ModelCounters:
    """Per model, outliving its instances (an evicted model keeps its history)."""

    loads_total: int = 0
    load_failures_total: int = 0
    evictions_total: int = 0
    last_error: str | None = None
    consecutive_failures: int = 0
    retry_at_s: float = 0.0
    last_tokens_per_second: float = 0.0  # decode speed of the last generation with tokens


@dataclass(eq=False)
class Instance:
    model: ModelFile
    counters: ModelCounters
    state: InstanceState = InstanceState.LOADING
    charge_bytes: int = 0
    measured: bool = False
    pinned: bool = False
    last_used_s: float = 0.0
    ready_at_s: float = 0.0
    loading_since_s: float = 0.0
    engine: Engine | None = None
    worker: EngineWorker | None = None
    active: ChoiceRun | None = None  # the request running (its choice, or between two)
    slot: FifoSlot = field(default_factory=FifoSlot)
    settled: anyio.Event = field(default_factory=anyio.Event)  # load finished, either way
    gone: anyio.Event = field(default_factory=anyio.Event)  # closed and out of the budget
    error: ModeldError | None = None
    disposal: anyio.CancelScope | None = None  # set while the engine closes; cancel abandons
    load_stage: str = "started"  # the loader's last progress stage
    load_progress: float = 0.0
    generations_started: int = 0
    keep_alive_s: float = math.inf  # how long it may stay idle; set by each request
    idle_since_s: float = 0.0  # on the pool's clock: when it last became idle
    embedding_bytes: int = 0  # the embedding context's estimate, charged on first use
    embedding_charged: bool = False
    threads: ThreadShare = field(default_factory=ThreadShare)  # its part of the budget

    @property
    def model_id(self) -> str:
        return self.model.id

    @property
    def idle(self) -> bool:
        return not self.slot.busy and self.slot.queue_len == 0

    @property
    def evictable(self) -> bool:
        return self.state is InstanceState.READY and self.idle and not self.pinned

    def expires_at_s(self) -> float | None:
        """When its keep-alive runs out, on the pool's clock; None while it is not
        counting down: busy, a request queued, pinned, not ready, or kept forever."""
        if not self.evictable or math.isinf(self.keep_alive_s):
            return None
        return self.idle_since_s + self.keep_alive_s

    def is_ready(self) -> bool:
        """A method, not a comparison at the call site: the state changes across awaits."""
        return self.state is InstanceState.READY

    def transition(self, new: InstanceState) -> None:
        if new not in _ALLOWED[self.state]:
            raise IllegalTransition(f"{self.model_id}: {self.state} -> {new} is not allowed")
        self.state = new

    def statistics(
        self, now_s: float, now_unix: float, clock_now_s: float | None = None
    ) -> InstanceStatistics:
        """A snapshot; ``clock_now_s`` is the pool's clock now (keep-alive times are on
        it), ``now_s`` the monotonic time the other fields are on."""
        expires_at_s = self.expires_at_s()
        clock_now_s = now_s if clock_now_s is None else clock_now_s
        return InstanceStatistics(
            model_id=self.model_id,
            state=self.state,
            last_used_unix=now_unix - (now_s - self.last_used_s),
            est_vram_mb=round(self.charge_bytes / MIB, 3),
            measured=self.measured,
            queue_len=self.slot.queue_len,
            inflight=1 if self.slot.busy else 0,
            loads_total=self.counters.loads_total,
            evictions_total=self.counters.evictions_total,
            last_error=self.counters.last_error,
            uptime_seconds=round(now_s - self.ready_at_s, 3) if self.ready_at_s else 0.0,
            pinned=self.pinned,
            retry_in_seconds=round(max(0.0, self.counters.retry_at_s - now_s), 3),
            last_tokens_per_second=self.counters.last_tokens_per_second,
            load_stage=self.load_stage if self.state is InstanceState.LOADING else None,
            load_progress=self.load_progress if self.state is InstanceState.LOADING else 0.0,
            keep_alive_seconds=None if math.isinf(self.keep_alive_s) else self.keep_alive_s,
            expires_at_unix=(
                None if expires_at_s is None else round(now_unix + expires_at_s - clock_now_s, 3)
            ),
            threads=self.threads.configured,
            threads_lease=self.threads.lease,
            openmp_pool_threads=self.threads.pool,
        )
