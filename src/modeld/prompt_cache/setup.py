"""The process's prompt cache, built from the settings beside the memory budget."""

from __future__ import annotations

from loguru import logger

from modeld.memory.budget import MemoryBudget
from modeld.prompt_cache.cache import PromptCache
from modeld.prompt_cache.disk_tier import DiskTier
from modeld.settings.config import Settings
from modeld.sizes import MIB

__all__ = ["build_prompt_cache", "memory_tier_mb"]

_DEFAULT_MAX_MB = 1024


def memory_tier_mb(settings: Settings, budget: MemoryBudget, *, gpu: bool) -> int:
    """``--prompt-cache-mb``, or the default: states are copied to host memory, so on
    GPU they do not compete with the VRAM budget (1 GiB of host memory); on CPU they
    do, and take at most an eighth of the budget."""
    if settings.prompt_cache_mb is not None:
        return settings.prompt_cache_mb
    return _DEFAULT_MAX_MB if gpu else min(_DEFAULT_MAX_MB, budget.budget_mb // 8)


def build_prompt_cache(settings: Settings, budget: MemoryBudget, *, gpu: bool) -> PromptCache:
    """On CPU the memory tier lives in what the budget leaves free and shrinks whenever a
    model is charged (it gives way before any model is evicted); off when its size is 0."""
    memory_mb = memory_tier_mb(settings, budget, gpu=gpu)
    if memory_mb == 0:
        return PromptCache(0)
    disk = None
    if settings.prompt_cache_disk_mb > 0:
        directory = settings.prompt_cache_dir or settings.state_path / "prompt-cache"
        try:
            disk = DiskTier(directory.expanduser(), settings.prompt_cache_disk_mb * MIB)
        except OSError as exc:
            logger.warning(
                "prompt cache: no disk tier (the directory cannot be used)", error=exc.strerror
            )
    if gpu:
        return PromptCache(memory_mb * MIB, disk=disk)
    cache = PromptCache(memory_mb * MIB, disk=disk, room=lambda: budget.free_bytes)
    budget.give_way_with(cache.shrink_to)
    return cache
