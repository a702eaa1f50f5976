"""Disk entries are written off the model's thread: a save (and the generation that
made it) returns before its file exists, the file still appears, restores after a
restart, is flushed at shutdown, and a writer without room drops and counts.

The disk tier is the real one behind a gate (:class:`GatedDisk`): with a real disk the
write may finish before the test looks, so "returned before it was written" could not
fail. The gate holds the writer's thread, never the model's.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from modeld.engine.base import TokenLoop
from modeld.gguf import FileIdentity
from modeld.prompt_cache.cache import PromptCache
from modeld.prompt_cache.disk_tier import DiskTier
from modeld.prompt_cache.disk_writer import WRITER_NICENESS, DiskWriter
from modeld.prompt_cache.memory_tier import MemoryTier
from modeld.prompt_cache.namespace import Namespace
from modeld.scheduling.manager import ModelManager
from modeld.sizes import MIB
from modeld.types import InferRequest
from tests.engine.test_prompt_reuse import answer, words
from tests.prompt_cache.test_restore import GREEDY, attach, make_engine
from tests.scheduling.conftest import ConstantProbe, make_settings
from tests.support.prompts import long_prompt

MODEL = "tiny-a.gguf"


class GatedDisk(DiskTier):
    """The real disk tier, whose writes wait until the test opens the gate."""

    def __init__(self, directory: Path, bound_bytes: int) -> None:
        super().__init__(directory, bound_bytes)
        self.gate = threading.Event()
        self.started = threading.Event()

    def save(self, namespace: Namespace, tokens: tuple[int, ...], payload: bytes) -> bool:
        self.started.set()
        assert self.gate.wait(60), "the test never opened the gate"
        return super().save(namespace, tokens, payload)


def _files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.pc"))


def test_a_save_returns_before_the_file_is_written_and_restores_after_a_restart(
    tiny_model_path: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    disk = GatedDisk(tmp_path, 64 * MIB)
    cache = PromptCache(64 * MIB, disk=disk)
    engine = make_engine(tiny_model_path, token_loop)
    attach(engine, tiny_model_path, cache)
    try:
        _, outcome = answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
        assert outcome.kv_tokens is not None
        exchange = list(outcome.kv_tokens)
        resumed = [*exchange, *words(engine, " and the world")]
        # another prompt displaces the exchange: saved, and this generation finishes
        # while the writer is held, so it never waited for the disk
        answer(engine, engine.tokenize("the world " * 20), GREEDY)
        assert disk.started.wait(30)
        assert _files(tmp_path) == []
        stats = cache.statistics()
        assert (stats.memory_entries, stats.disk_entries) == (1, 0)
        assert stats.disk_pending_bytes > 0
        assert cache.memory.held_bytes <= 64 * MIB
    finally:
        disk.gate.set()
        engine.attach_prompt_cache(None)  # the close saves nothing more
        engine.close()
    assert cache.close(60.0) == 0
    (entry,) = _files(tmp_path)
    assert stat.S_IMODE(entry.stat().st_mode) == 0o600
    assert cache.statistics().disk_pending_bytes == 0
    assert cache.statistics().disk_writes >= 1

    fresh = make_engine(tiny_model_path, token_loop, reuse=False)
    try:
        fresh_text, _ = answer(fresh, resumed, GREEDY)
    finally:
        fresh.close()
    restarted = PromptCache(64 * MIB, disk=DiskTier(tmp_path, 64 * MIB))
    second = make_engine(tiny_model_path, token_loop)
    attach(second, tiny_model_path, restarted)
    try:
        text, outcome = answer(second, resumed, GREEDY)
    finally:
        second.attach_prompt_cache(None)
        second.close()
    assert outcome.cached_tokens == len(exchange)
    assert text == fresh_text
    assert restarted.statistics().hits_disk == 1


@pytest.mark.anyio
async def test_shutdown_flushes_the_writes_of_the_instances_it_closes(
    models_dir: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    settings = make_settings(
        models_dir,
        n_ctx=1024,
        prompt_cache_mb=64,
        prompt_cache_disk_mb=64,
        prompt_cache_dir=directory,
        state_dir=tmp_path / "state",
    )
    manager = ModelManager(settings, token_loop=token_loop, probe=ConstantProbe())
    async with manager:
        await manager.complete(InferRequest(prompt=long_prompt(3), model=MODEL, max_tokens=4))
        assert _files(directory) == []  # the live context holds it; nothing saved yet
    # leaving the manager closed the instance (a save) and then drained the writer
    assert len(_files(directory)) == 1
    stats = manager.prompt_cache.statistics()
    assert (stats.disk_entries, stats.disk_writes, stats.disk_writes_dropped) == (1, 1, 0)


def _namespace() -> Namespace:
    return Namespace.of("m.gguf", FileIdentity(1, 2, 3, 4), 512, 64, 64)


def test_a_full_writer_drops_and_counts_and_shutdown_keeps_its_deadline(tmp_path: Path) -> None:
    disk = GatedDisk(tmp_path, 64 * MIB)
    cache = PromptCache(3 * MIB, disk=disk)  # room for three pending 1 MiB states
    assert cache.writer is not None
    namespace = _namespace()
    accepted = [
        cache.writer.submit(namespace, tuple(range(i, i + 40)), bytes([i]) * MIB) for i in range(5)
    ]
    assert accepted == [True, True, True, False, False]
    stats = cache.statistics()
    assert stats.disk_writes_dropped == 2
    assert stats.disk_pending_bytes == 3 * MIB
    assert cache.memory.held_bytes <= cache.memory.bound_bytes
    # a shutdown whose deadline passes with the disk held leaves the rest undone
    assert disk.started.wait(30)
    assert cache.close(0.2) == 2  # one is being written; two never started
    assert cache.statistics().disk_writes_dropped == 4
    assert not cache.writer.submit(namespace, tuple(range(50, 90)), b"x" * MIB)  # closed
    disk.gate.set()
    assert cache.flush(60.0)
    assert len(_files(tmp_path)) == 1  # the write under way finished
    assert cache.statistics().disk_pending_bytes == 0


def test_pending_writes_share_the_memory_bound_with_the_entries(tmp_path: Path) -> None:
    """A pending state the memory tier still holds costs nothing more; one it dropped
    evicts entries, so entries and pending writes never pass the bound together."""
    from modeld.prompt_cache.memory_tier import MemoryEntry

    disk = GatedDisk(tmp_path, 64 * MIB)
    cache = PromptCache(4 * MIB, disk=disk)
    assert cache.writer is not None
    namespace = _namespace()
    digest = namespace.digest()

    def entry(i: int, size_bytes: int = MIB) -> MemoryEntry:
        return MemoryEntry(digest, tuple(range(i, i + 40)), bytes([i]) * size_bytes)

    for i in range(2):  # saved: in memory and pending for the disk
        assert cache.memory.put(entry(i))
        assert cache.writer.submit(namespace, entry(i).tokens, entry(i).payload)
    for i in range(2, 4):
        assert cache.memory.put(entry(i))
    assert cache.memory.used_bytes == cache.memory.held_bytes == 4 * MIB  # shared
    assert cache.memory.put(entry(4))  # evicts 0 and 1 (still pending) and 2
    assert {e.tokens[0] for e in cache.memory.entries(digest)} == {3, 4}
    assert cache.memory.held_bytes == 4 * MIB  # 2 entries + 2 pending no entry holds
    assert not cache.memory.put(entry(5, 3 * MIB))  # would pass the bound with the pins
    disk.gate.set()
    assert cache.close(60.0) == 0
    assert len(_files(tmp_path)) == 2
    assert cache.memory.put(entry(5, 3 * MIB))  # the pins are gone with the writes


class NicenessProbe(DiskTier):
    """The real disk tier, noting the niceness of the thread that writes."""

    def __init__(self, directory: Path, bound_bytes: int) -> None:
        super().__init__(directory, bound_bytes)
        self.niceness: list[int] = []

    def save(self, namespace: Namespace, tokens: tuple[int, ...], payload: bytes) -> bool:
        self.niceness.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return super().save(namespace, tokens, payload)


def test_the_writer_runs_at_the_lowest_priority_and_the_caller_keeps_its_own(
    tmp_path: Path,
) -> None:
    """A checksum and copy beside a prompt evaluation would take a core from the model's
    OpenMP team: the writer thread yields (niceness 19); the rest of the process does not."""
    disk = NicenessProbe(tmp_path, 64 * MIB)
    cache = PromptCache(8 * MIB, disk=disk)
    assert cache.writer is not None
    own = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    assert cache.writer.submit(_namespace(), tuple(range(40)), b"x" * MIB)
    assert cache.flush(60.0)
    assert disk.niceness == [WRITER_NICENESS]
    assert len(_files(tmp_path)) == 1
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == own
    cache.close(5.0)


def test_a_write_waits_for_the_cache_to_settle_and_a_close_ends_the_wait(tmp_path: Path) -> None:
    """The save that queues a write comes as a turn starts evaluating its prompt: the
    write waits for the cache to be quiet (here: longer than the test), and shutting
    down writes it at once."""
    disk = DiskTier(tmp_path, 64 * MIB)
    memory = MemoryTier(8 * MIB, None)
    writer = DiskWriter(disk, memory, lambda *_: None, settle_s=3600.0, max_defer_s=3600.0)
    assert writer.submit(_namespace(), tuple(range(40)), b"x" * MIB)
    assert not writer.flush(0.5)  # still settling
    assert _files(tmp_path) == []
    assert writer.close(30.0) == 0  # the close ended the wait: written, none left
    assert len(_files(tmp_path)) == 1


def test_a_busy_cache_delays_a_write_only_so_long(tmp_path: Path) -> None:
    """A model that is never quiet still gets its entries written after the longest
    deferral."""
    disk = DiskTier(tmp_path, 64 * MIB)
    memory = MemoryTier(8 * MIB, None)
    writer = DiskWriter(disk, memory, lambda *_: None, settle_s=3600.0, max_defer_s=0.2)
    assert writer.submit(_namespace(), tuple(range(40)), b"x" * MIB)
    writer.note_activity()
    assert writer.flush(60.0)
    assert len(_files(tmp_path)) == 1
    writer.close(5.0)
