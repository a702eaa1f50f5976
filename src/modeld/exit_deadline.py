"""The promise that SIGTERM ends the process within ``--shutdown-grace`` + 5 s, kept even
when a thread is stuck in the kernel.

Shutdown abandons an instance whose worker does not stop (hung in llama.cpp), but a
thread blocked in a system call that never returns (a read of a model file on a stalled
FUSE or network mount, or the page fault of a mapped one) cannot be abandoned that way:
whatever waits for it (a load task, the task group that owns it) waits for ever, and so
does the process. :class:`ExitDeadline` is the backstop: armed when shutdown starts, it
lets the orderly path finish if it can; if the process is still here at the deadline,
it logs one line naming every thread still alive and where each is, and ends the process
with ``os._exit`` and the exit status an orderly shutdown has (0). The kernel ends the
stuck threads with the process; nothing is flushed but the log, which is written
synchronously.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from pathlib import Path

from loguru import logger

__all__ = ["ExitDeadline", "threads_alive"]


def threads_alive() -> list[str]:
    """Every thread but the caller's: its name and the function it is in."""
    frames = sys._current_frames()
    me = threading.get_ident()
    described = []
    for thread in threading.enumerate():
        if thread.ident == me or thread.ident is None:
            continue
        frame = frames.get(thread.ident)
        where = (
            f"{frame.f_code.co_name} ({Path(frame.f_code.co_filename).name}:{frame.f_lineno})"
            if frame is not None
            else "no Python frame"
        )
        described.append(f"{thread.name}: {where}")
    return described


class ExitDeadline:
    """A daemon thread that ends the process ``after_s`` seconds after :meth:`start`
    unless :meth:`cancel` comes first. Start it once; cancelling is idempotent."""

    def __init__(self, exit_status: int = 0) -> None:
        self._cancelled = threading.Event()
        self._exit_status = exit_status
        self._thread: threading.Thread | None = None

    def start(self, after_s: float) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(
            target=self._watch, args=(after_s,), name="modeld:exit-deadline", daemon=True
        )
        self._thread.start()

    def cancel(self) -> None:
        self._cancelled.set()

    def _watch(self, after_s: float) -> None:
        if self._cancelled.wait(after_s):
            return
        logger.error(
            "shutdown deadline passed: exiting now, abandoning threads that did not stop",
            after_s=after_s,
            abandoned=threads_alive(),
            exit_status=self._exit_status,
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(self._exit_status)
