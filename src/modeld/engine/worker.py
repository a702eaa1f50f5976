"""A dedicated thread per instance: the only thread that ever touches its llama context.

The event loop hands it callables and awaits their results through an eventfd, so waiting
costs no thread-pool thread and works the same under asyncio and trio.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

import anyio

__all__ = ["EngineWorker", "ThreadCall", "WorkerStopped"]

T = TypeVar("T")


class WorkerStopped(RuntimeError):
    """The worker thread has exited; nothing more can run on it."""


class ThreadCall(Generic[T]):
    """The pending result of one callable run on a worker thread."""

    def __init__(self, fn: Callable[[], T]) -> None:
        self._fn = fn
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._abandoned = False
        self._value: T | None = None
        self._error: BaseException | None = None

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the awaiting task, re-raised there
            self._error = exc
        self._fail_or_finish()

    def _fail_or_finish(self, error: BaseException | None = None) -> None:
        if error is not None:
            self._error = error
        with self._lock:
            self._done.set()
            if self._abandoned:
                self._close_fd()
            else:
                os.eventfd_write(self._fd, 1)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    async def wait(self) -> T:
        """The callable's result, or its exception re-raised.

        Cancelling the wait does not stop the callable: it runs to its end on the worker.
        """
        try:
            while not self._done.is_set():
                await anyio.wait_readable(self._fd)
        finally:
            with self._lock:
                if self._done.is_set():
                    self._close_fd()
                else:  # cancelled: the worker closes the fd when the callable ends
                    self._abandoned = True
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class EngineWorker:
    """Runs submitted callables one at a time, in order, on its own thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[ThreadCall[object] | None] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> ThreadCall[T]:
        call = ThreadCall(fn)
        if self._stopping:
            call._fail_or_finish(WorkerStopped("the instance's worker has stopped"))
            return call
        self._jobs.put(call)  # type: ignore[arg-type]
        return call

    async def run(self, fn: Callable[[], T]) -> T:
        return await self.submit(fn).wait()

    async def shutdown(self) -> None:
        """Let queued calls finish, then end the thread. Idempotent.

        Cancelling the wait leaves the thread to finish its queue and exit on its own.
        """
        if self._stopping:
            return
        self._stopping = True
        last = ThreadCall(lambda: None)
        self._jobs.put(last)  # type: ignore[arg-type]
        self._jobs.put(None)
        await last.wait()
        self._thread.join()  # only the sentinel is left: returns at once

    def _main(self) -> None:
        while True:
            call = self._jobs.get()
            if call is None:
                break
            call._run()
        # Calls that raced with stop() must not hang their waiters.
        while True:
            try:
                leftover = self._jobs.get_nowait()
            except queue.Empty:
                break
            if leftover is not None:
                leftover._fail_or_finish(WorkerStopped("the instance's worker has stopped"))
