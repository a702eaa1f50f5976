"""The frozen snapshots the core hands out (``ModelManager.statistics()`` and its
parts): read by ``/status``, ``/metrics``, the Ollama layer and the Ray router.

A leaf: it imports only :mod:`modeld.types`, so whoever reads a snapshot imports nothing
of the scheduler.
"""

from __future__ import annotations

from dataclasses import dataclass

from modeld.types import InstanceState

__all__ = [
    "CounterStatistics",
    "GuardStatistics",
    "InstanceStatistics",
    "ManagerStatistics",
    "RecentEvent",
]


@dataclass(frozen=True, slots=True)
class InstanceStatistics:
    model_id: str
    state: InstanceState
    last_used_unix: float
    est_vram_mb: float
    measured: bool
    queue_len: int
    inflight: int
    loads_total: int
    evictions_total: int
    last_error: str | None
    uptime_seconds: float
    pinned: bool
    retry_in_seconds: float
    last_tokens_per_second: float = 0.0
    load_stage: str | None = None  # while loading: the last stage reached
    load_progress: float = 0.0
    keep_alive_seconds: float | None = None  # None: kept loaded until unloaded or evicted
    expires_at_unix: float | None = None  # None: not counting down (busy, queued, pinned)
    threads: int = 0  # the threads it asks for (its setting, else the cores); 0: not yet
    threads_lease: int = 0  # the threads its running work got from the budget; 0: none
    openmp_pool_threads: int = 1  # the OpenMP team its worker keeps between work


@dataclass(frozen=True, slots=True)
class GuardStatistics:
    probe_load: bool
    state_dir_ok: bool
    quarantined_files: int
    probes: dict[str, int]  # by outcome
    crashes: tuple[tuple[str, str, int], ...]  # (model, stage, count) found at start-up


@dataclass(frozen=True, slots=True)
class RecentEvent:
    kind: str
    time_unix: float
    model: str
    details: dict[str, object]  # the event's own fields besides ``model``


@dataclass(frozen=True, slots=True)
class CounterStatistics:
    """A model's totals, kept after its instance is gone."""

    model_id: str
    loads_total: int
    load_failures_total: int
    evictions_total: int


@dataclass(frozen=True, slots=True)
class CacheStatistics:
    """What /status and /metrics show (counters since start, gauges now)."""

    enabled: bool
    in_budget: bool  # the memory tier lives in the budget's free memory (CPU)
    memory_bound_bytes: int
    memory_allowed_bytes: int
    memory_bytes: int
    memory_entries: int
    disk_enabled: bool
    disk_bound_bytes: int
    disk_bytes: int
    disk_entries: int
    disk_pending_bytes: int  # states waiting for the disk writer (within the memory bound)
    disk_writes: int
    disk_writes_dropped: int  # no room in the bound, or left undone at shutdown
    disk_write_seconds: float  # on the writer's thread, not a model's
    hits_memory: int
    hits_disk: int
    misses: int
    saves: int
    restored_tokens: int
    restore_failures: int
    invalid_removed: int
    given_way_bytes: int
    restore_seconds: float
    save_seconds: float


@dataclass(frozen=True, slots=True)
class ManagerStatistics:
    budget_mb: int
    margin_mb: int
    used_est_mb: float
    server_time_unix: float
    uptime_seconds: float
    token_loop: str
    memory_probe: str
    admitted: int
    running: int
    accepting: bool
    instances: tuple[InstanceStatistics, ...]
    counters: tuple[CounterStatistics, ...]
    crash_containment: GuardStatistics
    recent_events: tuple[RecentEvent, ...] = ()
    prompt_cache: CacheStatistics | None = None
