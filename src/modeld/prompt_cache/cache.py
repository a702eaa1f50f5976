"""The prompt cache: several token prefixes per model, kept in memory and on disk.

An instance's live context is the first tier (``engine/kv_prefix.py``: the next prompt
keeps what it shares with the last one). This is the second: before a generation would
throw away a long stretch of the context (another conversation, a different prompt) and
before an instance is unloaded, the sequence's state is saved here, keyed by its model
:class:`Namespace` and its tokens. A request whose tokens share a longer prefix with a
saved entry than with the live context restores that entry and evaluates only the rest.

:class:`PromptCache` is shared by every instance (its tiers, counters and bounds);
:class:`ModelPromptCache` is one engine's view of it, bound to its namespace and called
only on that engine's owner thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from loguru import logger

from modeld.engine.seq_state import read_state, sliding_window, usable_prefix, write_state
from modeld.events import PromptCacheRestored
from modeld.prompt_cache.disk_tier import DiskEntry, DiskTier
from modeld.prompt_cache.disk_writer import DiskWriter
from modeld.prompt_cache.memory_tier import MemoryEntry, MemoryTier
from modeld.prompt_cache.namespace import Namespace
from modeld.sizes import MIB
from modeld.statistics import CacheStatistics

if TYPE_CHECKING:
    from llama_cpp import Llama

__all__ = ["MIN_ENTRY_TOKENS", "CacheStatistics", "ModelPromptCache", "PromptCache"]

# Shorter sequences are re-evaluated faster than a state is looked up and copied.
MIN_ENTRY_TOKENS = 32
# A restore replaces the live context: it must win at least this many tokens over it.
MIN_GAIN_TOKENS = 8


class _Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits_memory = 0
        self.hits_disk = 0
        self.misses = 0
        self.saves = 0
        self.restored_tokens = 0
        self.restore_failures = 0
        self.restore_seconds = 0.0
        self.save_seconds = 0.0


class PromptCache:
    """Both tiers and their counters. ``memory_bound_bytes=0`` and no ``disk`` turn it
    off; ``room`` is what the memory budget leaves free (None: not counted there)."""

    def __init__(
        self,
        memory_bound_bytes: int,
        *,
        disk: DiskTier | None = None,
        room: Callable[[], int] | None = None,
    ) -> None:
        self.memory = MemoryTier(memory_bound_bytes, room)
        self.disk = disk
        # Disk entries are written off the engines' threads, within the memory bound.
        self.writer = DiskWriter(disk, self.memory, self._written) if disk else None
        self._counters = _Counters()
        # Called on the restoring engine's thread (the manager posts it to /events).
        self.on_restore: Callable[[PromptCacheRestored], None] | None = None

    @property
    def enabled(self) -> bool:
        return self.memory.bound_bytes > 0 or self.disk is not None

    def for_model(self, namespace: Namespace) -> ModelPromptCache | None:
        """The engine-side view for ``namespace``; None when the cache is off."""
        return ModelPromptCache(self, namespace) if self.enabled else None

    def flush(self, timeout_s: float) -> bool:
        """Wait for pending disk writes; False when ``timeout_s`` ran out first."""
        return self.writer is None or self.writer.flush(timeout_s)

    def close(self, timeout_s: float) -> int:
        """At shutdown: finish pending disk writes within ``timeout_s``; returns how many
        were left undone. Later saves keep the memory tier only."""
        return 0 if self.writer is None else self.writer.close(timeout_s)

    def shrink_to(self, limit_bytes: int) -> int:
        """Give way to a model: the memory tier keeps at most ``limit_bytes``."""
        return self.memory.shrink_to(limit_bytes)

    @property
    def max_entry_bytes(self) -> int:
        return max(self.memory.bound_bytes, self.disk.bound_bytes if self.disk else 0)

    def statistics(self) -> CacheStatistics:
        c, disk, writer = self._counters, self.disk, self.writer
        with c.lock:
            return CacheStatistics(
                enabled=self.enabled,
                in_budget=self.memory.in_budget,
                memory_bound_bytes=self.memory.bound_bytes,
                memory_allowed_bytes=self.memory.allowed_bytes(),
                memory_bytes=self.memory.used_bytes,
                memory_entries=self.memory.count,
                disk_enabled=disk is not None,
                disk_bound_bytes=disk.bound_bytes if disk else 0,
                disk_bytes=disk.used_bytes if disk else 0,
                disk_entries=disk.count if disk else 0,
                disk_pending_bytes=self.memory.pinned_bytes,
                disk_writes=writer.written if writer else 0,
                disk_writes_dropped=writer.dropped if writer else 0,
                disk_write_seconds=writer.write_seconds if writer else 0.0,
                hits_memory=c.hits_memory,
                hits_disk=c.hits_disk,
                misses=c.misses,
                saves=c.saves,
                restored_tokens=c.restored_tokens,
                restore_failures=c.restore_failures,
                invalid_removed=disk.removed_invalid if disk else 0,
                given_way_bytes=self.memory.given_way_bytes,
                restore_seconds=c.restore_seconds,
                save_seconds=c.save_seconds,
            )

    def _best(
        self, namespace: Namespace, prompt: Sequence[int], n_swa: int
    ) -> tuple[int, MemoryEntry | DiskEntry | None]:
        """The entry a restore keeps most of ``prompt`` from (memory wins a tie)."""
        digest = namespace.digest()
        best: tuple[int, MemoryEntry | DiskEntry | None] = (0, None)
        candidates: list[MemoryEntry | DiskEntry] = [*self.memory.entries(digest)]
        if self.disk is not None:
            candidates.extend(self.disk.entries(digest))
        for entry in candidates:
            shared = usable_prefix(entry.tokens, prompt, n_swa)
            if shared > best[0]:
                best = (shared, entry)
        return best

    def _covered(self, namespace: Namespace, tokens: tuple[int, ...], whole_only: bool) -> bool:
        """Some entry already serves what ``tokens`` would: one holding them or more (a
        superset), or with ``whole_only`` (a sliding window, where only whole entries
        restore: a longer entry cannot serve a branch inside it) exactly them."""
        digest, n = namespace.digest(), len(tokens)
        entries: list[MemoryEntry | DiskEntry] = [*self.memory.entries(digest)]
        if self.disk is not None:
            entries.extend(self.disk.entries(digest))
        if whole_only:
            return any(e.tokens == tokens for e in entries)
        return any(len(e.tokens) >= n and e.tokens[:n] == tokens for e in entries)

    def _drop_superseded(self, namespace: Namespace, tokens: tuple[int, ...]) -> None:
        """Memory entries whose tokens are a strict prefix of ``tokens``: the new one
        serves every prompt they served (a chat's earlier turns)."""
        for entry in self.memory.entries(namespace.digest()):
            if len(entry.tokens) < len(tokens) and tokens[: len(entry.tokens)] == entry.tokens:
                self.memory.remove(entry)

    def _written(self, namespace: Namespace, tokens: tuple[int, ...]) -> None:
        """On the writer's thread, once ``tokens``' file is in place: the disk entries it
        supersedes go (not before, so that a crash between keeps the older one)."""
        if self.disk is not None:
            for disk_entry in self.disk.entries(namespace.digest()):
                n = len(disk_entry.tokens)
                if n < len(tokens) and tokens[:n] == disk_entry.tokens:
                    self.disk.drop(disk_entry)


class ModelPromptCache:
    """One engine's prompt cache. Every method runs on the engine's owner thread."""

    def __init__(self, cache: PromptCache, namespace: Namespace) -> None:
        self._cache = cache
        self.namespace = namespace

    def prepare(
        self,
        llama: Llama,
        held: Sequence[int],
        prompt: Sequence[int],
        live: int,
        cancelled: Callable[[], bool],
    ) -> tuple[int, Sequence[int]]:
        """Before a generation: ``(cached, held)`` for the loop, where ``live`` is what
        the context itself can keep of ``held``.

        Saves ``held`` when the prompt would discard a long stretch of it; restores the
        cached entry sharing the longest prefix with ``prompt`` when that beats the live
        context, and then ``held`` is that entry's tokens. A failed restore leaves the
        context cleared: ``(0, ())``.
        """
        cache, counters = self._cache, self._cache._counters
        if cache.writer is not None:
            cache.writer.note_activity()
        if len(held) - live >= MIN_ENTRY_TOKENS:
            self.save(llama, held)
        shared, entry = cache._best(self.namespace, prompt, sliding_window(llama))
        if entry is None or shared < live + MIN_GAIN_TOKENS or cancelled():
            with counters.lock:
                counters.misses += 1
            return live, held
        started = time.perf_counter()
        payload = self._payload(entry)
        if payload is None or cancelled():
            with counters.lock:
                counters.misses += payload is None
            return live, held
        if not write_state(llama, payload, len(entry.tokens)):
            self._forget(entry)
            with counters.lock:
                counters.restore_failures += 1
            logger.warning("prompt cache: llama.cpp refused a state", model=self.namespace.model_id)
            return 0, ()
        elapsed = time.perf_counter() - started
        tier = "memory" if isinstance(entry, MemoryEntry) else "disk"
        with counters.lock:
            if tier == "memory":
                counters.hits_memory += 1
            else:
                counters.hits_disk += 1
            counters.restored_tokens += shared
            counters.restore_seconds += elapsed
        restored = PromptCacheRestored(
            model=self.namespace.model_id,
            tier=tier,
            tokens=shared,
            mib=round(len(payload) / MIB, 2),
            ms=round(elapsed * 1000, 2),
        )
        logger.info("prompt cache: restored a prefix", **restored.fields())
        if cache.on_restore is not None:
            cache.on_restore(restored)
        return shared, entry.tokens

    def _payload(self, entry: MemoryEntry | DiskEntry) -> bytes | None:
        cache = self._cache
        if isinstance(entry, MemoryEntry):
            cache.memory.touch(entry)
            return entry.payload
        assert cache.disk is not None  # a disk entry came from it
        payload = cache.disk.load(entry, self.namespace, cache.max_entry_bytes)
        if payload is not None and cache.memory.bound_bytes > 0:
            cache.memory.put(MemoryEntry(entry.namespace_digest, entry.tokens, payload))
        return payload

    def _forget(self, entry: MemoryEntry | DiskEntry) -> None:
        if isinstance(entry, MemoryEntry):
            self._cache.memory.remove(entry)
        elif self._cache.disk is not None:
            self._cache.disk.drop(entry)

    def keeps_in_memory(self, n_tokens: int) -> bool:
        """Whether a prefix of ``n_tokens`` is one the memory tier would take."""
        return n_tokens >= MIN_ENTRY_TOKENS and self._cache.memory.bound_bytes > 0

    def save(self, llama: Llama, held: Sequence[int], *, to_disk: bool = True) -> bool:
        """Keep the context's state, which holds exactly ``held``; True when kept in
        memory or queued for the disk (written later, off this thread). Never raises:
        the cache is an optimisation.

        ``to_disk=False`` (an idle model's prefix, :meth:`CacheTier.keep_idle`) keeps it
        in memory only: a conversation that goes on supersedes it next turn, and writing
        each turn's state would cost the disk and the CPU for nothing. Its file is
        written when it is saved again for real: displaced by another prompt, or at the
        engine's close (:meth:`_write_kept`), from the copy already kept."""
        tokens = tuple(held)
        cache = self._cache
        if len(tokens) < MIN_ENTRY_TOKENS:
            return False
        if to_disk and self._write_kept(tokens):
            return True
        whole_only = sliding_window(llama) > 0
        if cache._covered(self.namespace, tokens, whole_only):
            return False
        started = time.perf_counter()
        try:
            payload = read_state(llama, cache.max_entry_bytes)
        except Exception as exc:  # a llama.cpp failure must not fail the generation
            logger.warning("prompt cache: reading a state failed", error=repr(exc))
            return False
        if payload is None:
            return False
        digest = self.namespace.digest()
        kept = cache.memory.bound_bytes > 0 and cache.memory.put(
            MemoryEntry(digest, tokens, payload)
        )
        if to_disk and cache.writer is not None:  # written on the writer's thread
            kept = cache.writer.submit(self.namespace, tokens, payload) or kept
        if kept:
            cache._drop_superseded(self.namespace, tokens)
        counters = cache._counters
        with counters.lock:
            counters.saves += kept
            counters.save_seconds += time.perf_counter() - started
        return kept

    def _write_kept(self, tokens: tuple[int, ...]) -> bool:
        """Queue the file of a memory entry holding exactly ``tokens`` that the disk
        does not have yet (kept while idle); False when there is none to queue."""
        cache, digest = self._cache, self.namespace.digest()
        if cache.writer is None or cache.disk is None:
            return False
        if any(entry.tokens == tokens for entry in cache.disk.entries(digest)):
            return False
        for entry in cache.memory.entries(digest):
            if entry.tokens == tokens:
                return cache.writer.submit(self.namespace, tokens, entry.payload)
        return False
