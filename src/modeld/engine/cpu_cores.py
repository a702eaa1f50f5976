"""How many cores this process may use: its CPU affinity, capped by a container's quota.

The thread budget (:mod:`modeld.scheduling.threads`) keeps llama.cpp's threads across
all loaded models within this number. ``os.cpu_count()`` is the host's count and says
nothing about ``taskset``, cpusets or a ``docker --cpus`` limit, all of which this reads.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "usable_cores"]

_CGROUP_V2 = Path("/sys/fs/cgroup/cpu.max")
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def usable_cores() -> int:
    """The cores this process may run on at once (at least 1): the CPUs in its affinity
    mask, fewer when a cgroup CPU quota allows fewer (a quota of 1.5 CPUs counts as 1:
    a second spinning thread would be throttled by the scheduler)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, math.floor(limit)))
    return max(1, cores)


def cgroup_cpu_limit(
    v2: Path = _CGROUP_V2, v1_quota: Path = _CGROUP_V1_QUOTA, v1_period: Path = _CGROUP_V1_PERIOD
) -> float | None:
    """The CPUs a cgroup quota allows (``quota / period``); None when there is none or
    it cannot be read. cgroup v2's ``cpu.max`` is ``"max 100000"`` or ``"150000 100000"``;
    v1 has ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us``."""
    try:
        quota_text, period_text = v2.read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota_text = v1_quota.read_text().strip()
            period_text = v1_period.read_text().strip()
        except OSError:
            return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:  # "max": no quota
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period
