"""The pure-Python twin of the C ring: same semantics, a lock instead of atomics."""

from __future__ import annotations

import os
import threading
from collections import deque
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from modeld.engine.logprobs import RawLogprob

__all__ = ["PyTokenRing"]


class _WakeFd:
    """An eventfd (or a pipe where there is none) that is readable while 'set'."""

    def __init__(self) -> None:
        if hasattr(os, "eventfd"):
            self._read_fd = self._write_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._is_eventfd = True
        else:  # pragma: no cover - non-Linux
            self._read_fd, self._write_fd = os.pipe()
            os.set_blocking(self._read_fd, False)
            self._is_eventfd = False

    def fileno(self) -> int:
        return self._read_fd

    def set(self) -> None:
        if self._is_eventfd:
            os.eventfd_write(self._write_fd, 1)
        else:  # pragma: no cover
            os.write(self._write_fd, b"x")

    def clear(self) -> None:
        try:
            if self._is_eventfd:
                os.eventfd_read(self._read_fd)
            else:  # pragma: no cover
                while os.read(self._read_fd, 4096):
                    pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._read_fd)
        if self._write_fd != self._read_fd:  # pragma: no cover
            os.close(self._write_fd)


class PyTokenRing:
    """Bounded byte buffer between one producer thread and the event loop."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes < 16:
            raise ValueError("ring capacity must be at least 16 bytes")
        self._capacity_bytes = capacity_bytes
        self._buffer = bytearray()
        self._tokens = 0
        self._notified = False  # the wake-up was set (or watch_finish armed) since the drain
        self._wake_at_start = False
        self._finished = False
        self._cancelled = False
        self._closed = False
        self._cond = threading.Condition()
        self._wake = _WakeFd()
        self._logprobs: deque[RawLogprob] = deque()

    def fileno(self) -> int:
        return self._wake.fileno()

    def push(self, data: bytes, tokens: int) -> bool:
        view = memoryview(data)
        first = True
        with self._cond:
            while view or first:
                while not self._cancelled and len(self._buffer) >= self._capacity_bytes:
                    self._cond.wait()
                if self._cancelled:
                    return False
                room = self._capacity_bytes - len(self._buffer)
                piece, view = view[:room], view[room:]
                self._buffer += piece
                if first:
                    self._tokens += tokens
                    first = False
                if not self._notified:
                    self._notified = True
                    self._wake.set()
        return True

    def push_logprob(self, entry: RawLogprob) -> None:
        """Queue a token's log probabilities, before its text is pushed."""
        self._logprobs.append(entry)  # deque appends and pops are atomic

    def drain_logprobs(self) -> list[RawLogprob]:
        taken = []
        while self._logprobs:
            taken.append(self._logprobs.popleft())
        return taken

    def drain(self) -> tuple[bytes, int, bool]:
        with self._cond:
            self._wake.clear()
            self._notified = False
            data, tokens = bytes(self._buffer), self._tokens
            self._buffer.clear()
            self._tokens = 0
            self._cond.notify_all()
            return data, tokens, self._finished

    def watch_finish(self) -> bool:
        with self._cond:
            self._wake.clear()
            self._notified = True  # until the next drain, only finish() sets it
            return self._finished

    def finish(self) -> None:
        with self._cond:
            if not self._finished:
                self._finished = True
                self._wake.set()

    def wake_at_start(self) -> None:
        self._wake_at_start = True

    def loop_started(self) -> None:
        with self._cond:
            if self._wake_at_start and not self._notified:
                self._notified = True
                self._wake.set()
            self._wake_at_start = False

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
        self._wake.close()
