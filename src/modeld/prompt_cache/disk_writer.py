"""The disk tier's writer: entries reach the disk off the model's worker thread.

A save copies the sequence state on the model's worker (llama.cpp's context belongs to
that thread) and hands the bytes to the memory tier. Writing the file (checksum, temporary
file, atomic rename) costs more than the copy and would delay the next request on that
model, so it happens here, on one background thread per cache.

The queue is bounded by the cache's memory bound: each pending state is pinned in the
memory tier (:meth:`~modeld.prompt_cache.memory_tier.MemoryTier.pin`), where it shares
its bytes with the memory entry or, when that entry is gone, evicts others to count.
A state that cannot be pinned is not written: it is dropped and counted
(``modeld_prompt_cache_writes_dropped``), and a save never waits for the disk.
:meth:`DiskWriter.close` drains what is pending within the shutdown deadline.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from modeld.prompt_cache.disk_tier import DiskTier
from modeld.prompt_cache.memory_tier import MemoryTier
from modeld.prompt_cache.namespace import Namespace

__all__ = ["DiskWriter"]

WRITER_NICENESS = 19
"""The writer thread's Linux niceness: its checksum and copy run where the model's
threads leave a core free, never beside a prompt evaluation (with OpenMP's spinning
barriers a core taken from one thread of a team stalls the whole team)."""


def _yield_to_generation() -> None:
    """Lower this thread's scheduling priority (Linux threads have their own niceness);
    elsewhere, or where it is refused, the writer runs at normal priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
    except (AttributeError, OSError) as exc:
        logger.debug("prompt cache: the disk writer keeps its priority", error=repr(exc))


SETTLE_S = 0.3
"""A write waits until the cache has been quiet this long: the save that queued it came
at the start of a turn whose prompt is being evaluated right then."""
MAX_DEFER_S = 2.0
"""...but never longer than this after it was queued (a busy model is never quiet)."""


@dataclass(frozen=True, slots=True)
class _Pending:
    namespace: Namespace
    tokens: tuple[int, ...]
    payload: bytes
    queued_s: float

    @property
    def key(self) -> tuple[str, tuple[int, ...]]:
        return (self.namespace.digest(), self.tokens)


class DiskWriter:
    """Writes entries to ``disk`` in submission order on a daemon thread (started on the
    first write). ``on_written(namespace, tokens)`` runs there after each file is in
    place."""

    def __init__(
        self,
        disk: DiskTier,
        memory: MemoryTier,
        on_written: Callable[[Namespace, tuple[int, ...]], None],
        *,
        settle_s: float = SETTLE_S,
        max_defer_s: float = MAX_DEFER_S,
    ) -> None:
        self._disk = disk
        self._settle_s = settle_s
        self._max_defer_s = max_defer_s
        self._active_s = 0.0  # when the cache last saved or restored
        self._memory = memory
        self._on_written = on_written
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._writing: _Pending | None = None
        self._closed = False
        self._thread: threading.Thread | None = None
        self.written = 0
        self.dropped = 0
        self.write_seconds = 0.0

    @property
    def pending(self) -> int:
        with self._cond:
            return len(self._queue) + (self._writing is not None)

    def submit(self, namespace: Namespace, tokens: tuple[int, ...], payload: bytes) -> bool:
        """Queue an entry; False (counted) when the cache's bound has no room for it or
        the writer is closed. Never blocks on the disk."""
        item = _Pending(namespace, tokens, payload, time.monotonic())
        self.note_activity()
        with self._cond:
            if self._is_pending(item.key):
                return True
            if self._closed or not self._memory.pin(item.key, len(payload)):
                self.dropped += 1
                logger.debug("prompt cache: a disk write was dropped (no room)", tokens=len(tokens))
                return False
            self._queue.append(item)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="prompt-cache-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()
        return True

    def note_activity(self) -> None:
        """The cache is serving a turn (a restore or save): writes wait a little."""
        self._active_s = time.monotonic()

    def _wait_for_quiet(self, item: _Pending) -> None:
        """Called with ``_cond`` held: wait until the cache has been quiet for the settle
        time, at most until ``item`` has waited the longest deferral; a close ends it."""
        while not self._closed:
            wait_s = (
                min(self._active_s + self._settle_s, item.queued_s + self._max_defer_s)
                - time.monotonic()
            )
            if wait_s <= 0:
                return
            self._cond.wait(wait_s)

    def _is_pending(self, key: tuple[str, tuple[int, ...]]) -> bool:
        items = [*self._queue, *([self._writing] if self._writing else [])]
        return any(item.key == key for item in items)

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued entry is written; False when ``timeout_s`` ran out."""
        deadline_s = time.monotonic() + timeout_s
        with self._cond:
            while self._queue or self._writing is not None:
                remaining_s = deadline_s - time.monotonic()
                if remaining_s <= 0:
                    return False
                self._cond.wait(remaining_s)
        return True

    def close(self, timeout_s: float) -> int:
        """Take no more writes, drain for at most ``timeout_s``; returns how many entries
        were left unwritten (dropped, counted and logged)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.flush(timeout_s)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self.dropped += len(left)
        for item in left:
            self._memory.unpin(item.key)
        if left:
            logger.warning("prompt cache: shutdown left disk writes undone", entries=len(left))
        return len(left)

    def _run(self) -> None:
        _yield_to_generation()
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._writing = self._queue.popleft()
                self._wait_for_quiet(item)
            started = time.perf_counter()
            written = False
            try:
                written = self._disk.save(item.namespace, item.tokens, item.payload)
                if written:
                    self._on_written(item.namespace, item.tokens)
            except Exception as exc:  # the writer must outlive any one entry
                logger.warning("prompt cache: writing an entry failed", error=repr(exc))
            finally:
                self._memory.unpin(item.key)
                with self._cond:
                    self._writing = None
                    self.written += written
                    self.write_seconds += time.perf_counter() - started
                    self._cond.notify_all()
