"""The memory tier lives in what the budget leaves free: it gives way to every model
charge before any model is evicted, and its bound holds for the process's RSS."""

from __future__ import annotations

import os
from pathlib import Path

from modeld.gguf import FileIdentity
from modeld.memory.budget import Candidate, MemoryBudget, choose_victims
from modeld.prompt_cache.memory_tier import MemoryEntry
from modeld.prompt_cache.namespace import Namespace
from modeld.prompt_cache.setup import build_prompt_cache, memory_tier_mb
from modeld.settings.config import Settings
from modeld.sizes import MIB


def _entry(i: int, size_bytes: int = MIB) -> MemoryEntry:
    return MemoryEntry("ns", tuple(range(i, i + 40)), os.urandom(size_bytes))


def _settings(tmp_path: Path, **values: object) -> Settings:
    return Settings(state_dir=tmp_path, prompt_cache_disk_mb=0, **values)  # type: ignore[arg-type]


def test_the_cache_gives_way_before_any_model_is_evicted(tmp_path: Path) -> None:
    budget = MemoryBudget(budget_mb=100, margin_mb=0)
    cache = build_prompt_cache(_settings(tmp_path, prompt_cache_mb=64), budget, gpu=False)
    budget.charge("a.gguf", 20 * MIB)
    for i in range(64):
        cache.memory.put(_entry(i))
    assert cache.memory.used_bytes == 64 * MIB  # its own bound, inside the free 80 MiB
    # a load of 50 MiB: the models alone fit, so no model is a victim ...
    candidates = [Candidate("a.gguf", 20 * MIB, 0.0, evictable=True)]
    assert choose_victims(candidates, 50 * MIB, budget.used_bytes, budget.limit_bytes) == []
    budget.charge("b.gguf", 50 * MIB)  # ... and the cache shrinks into what is left
    assert cache.memory.used_bytes <= 30 * MIB
    assert budget.used_bytes + cache.memory.used_bytes <= budget.limit_bytes
    assert cache.statistics().given_way_bytes >= 34 * MIB
    # the most recently used entries are the ones kept
    kept = {e.tokens[0] for e in cache.memory.entries("ns")}
    assert kept == set(range(64 - len(kept), 64))
    # nothing new is admitted past the free memory either
    budget.charge("c.gguf", 30 * MIB)
    assert cache.memory.used_bytes == 0
    assert not cache.memory.put(_entry(99))


def test_the_sizes_default_and_zero_turns_it_off(tmp_path: Path) -> None:
    budget = MemoryBudget(budget_mb=4096, margin_mb=0)
    assert memory_tier_mb(_settings(tmp_path), budget, gpu=False) == 512
    assert memory_tier_mb(_settings(tmp_path), MemoryBudget(65536, 0), gpu=False) == 1024
    assert memory_tier_mb(_settings(tmp_path), budget, gpu=True) == 1024
    off = build_prompt_cache(_settings(tmp_path, prompt_cache_mb=0), budget, gpu=False)
    assert not off.enabled
    on_gpu = build_prompt_cache(_settings(tmp_path, prompt_cache_mb=8), budget, gpu=True)
    budget.charge("a.gguf", 4096 * MIB)  # the VRAM budget full: host memory is not it
    assert on_gpu.memory.put(_entry(0))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_rss_stays_within_the_bound_while_states_churn(tmp_path: Path) -> None:
    """As a save does: each state into the memory tier and queued for the disk writer,
    whose pending states count inside the same bound."""
    budget = MemoryBudget(budget_mb=1024, margin_mb=0)
    settings = Settings(state_dir=tmp_path, prompt_cache_mb=32, prompt_cache_disk_mb=64)
    cache = build_prompt_cache(settings, budget, gpu=False)
    assert cache.writer is not None
    namespace = Namespace.of("m.gguf", FileIdentity(1, 2, 3, 4), 512, 64, 64)
    before = _rss_bytes()
    peak = before
    for i in range(200):  # 200 MiB of states through a 32 MiB bound
        entry = _entry(i)
        entry = MemoryEntry(namespace.digest(), entry.tokens, entry.payload)
        cache.memory.put(entry)
        cache.writer.submit(namespace, entry.tokens, entry.payload)
        assert cache.memory.held_bytes <= 32 * MIB
        peak = max(peak, _rss_bytes())
    assert cache.close(60.0) == 0
    assert cache.statistics().disk_writes >= 1
    slack = 16 * MIB  # one entry being built, allocator slack
    assert peak - before <= 32 * MIB + slack
