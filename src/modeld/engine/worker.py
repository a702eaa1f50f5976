"""A dedicated thread per instance: the only thread that ever touches its llama context.

The event loop hands it callables and awaits their results. The thread reports a finished
call by scheduling a callback on the event loop (asyncio's ``call_soon_threadsafe``,
trio's ``TrioToken.run_sync_soon``): waiting costs no thread-pool thread and no file
descriptor, so an unload or a shutdown still completes when the process has run out of
descriptors.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar, cast

import anyio
from anyio.lowlevel import current_token

__all__ = ["EngineWorker", "ThreadCall", "WorkerStopped"]

T = TypeVar("T")
# How long a waiter gives a wake descriptor (see EngineWorker.submit_signalling) before a
# signal wakes it as usual: a callable that signalled, then does slow work before what
# makes the descriptor readable (a prompt-cache restore before the token loop), is seen
# as signalled within this.
SIGNAL_PATIENCE_S = 0.002
LoopCallback = Callable[[Callable[[], None]], None]


class WorkerStopped(RuntimeError):
    """The worker thread has exited; nothing more can run on it."""


def loop_callback() -> LoopCallback:
    """A thread-safe way to run a callback on the current event loop's thread.

    The callback is dropped when the loop has ended: nobody is left to wait for it.
    """
    native = current_token().native_token
    if isinstance(native, asyncio.AbstractEventLoop):
        loop = native

        def on_asyncio(callback: Callable[[], None]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(callback)

        return on_asyncio
    import trio  # the only other backend anyio runs on

    token = cast(trio.lowlevel.TrioToken, native)

    def on_trio(callback: Callable[[], None]) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            token.run_sync_soon(callback)

    return on_trio


class ThreadCall(Generic[T]):
    """The pending result of one callable run on a worker thread.

    Made on the event loop's thread; its completion is signalled there.
    """

    def __init__(
        self, fn: Callable[[], T], on_loop: LoopCallback, wake_fd: int | None = None
    ) -> None:
        self._fn = fn
        self._on_loop = on_loop
        self._wake_fd = wake_fd  # a signal wakes no one: this descriptor does
        self._fd_wait: anyio.CancelScope | None = None
        self._signal_lock = threading.Lock()
        self._wake_at_signal = wake_fd is None  # waited past the patience: wake as usual
        self._finished = anyio.Event()
        self._done = threading.Event()
        self._callbacks: list[Callable[[], None]] = []
        self._value: T | None = None
        self._error: BaseException | None = None
        self._signalled = False
        self._woken = anyio.Event()  # at the callable's signal, or at its end

    def _run(self) -> None:
        try:
            self._value = self._fn()
        except BaseException as exc:  # handed to the awaiting task, re-raised there
            self._error = exc
        self._complete()

    def _complete(self, error: BaseException | None = None) -> None:
        """Any thread: record the end and let the event loop know."""
        if error is not None:
            self._error = error
        self._done.set()
        self._on_loop(self._settle)

    def signal(self) -> None:
        """Worker thread: the callable has reached the point :meth:`signalled` waits for
        (it goes on running). With a wake descriptor the signal is only recorded: the
        waiter wakes when the descriptor turns readable
        (:meth:`EngineWorker.submit_signalling`)."""
        with self._signal_lock:
            self._signalled = True  # (the loop's own flag too: set again there, harmless)
            wake = self._wake_at_signal
        if wake:
            self._on_loop(self._on_signal)

    def _on_signal(self) -> None:
        self._signalled = True
        self._woken.set()

    def _settle(self) -> None:
        if self._finished.is_set():  # settled early by wait()
            return
        self._finished.set()
        self._woken.set()
        if self._fd_wait is not None:
            self._fd_wait.cancel()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def done(self) -> bool:
        """True once the callable has returned or raised (any thread may ask)."""
        return self._done.is_set()

    def when_done(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` on the event loop once the call has ended (now, if it has)."""
        if self._finished.is_set():
            callback()
        else:
            self._callbacks.append(callback)

    async def signalled(self) -> bool:
        """Wait until the callable calls :meth:`signal` or ends: True once it signalled
        (it may still run); its exception re-raised when it raised first; False when it
        returned without signalling.

        Cancelling the wait does not stop the callable.
        """
        if self._wake_fd is not None and not self._signalled and not self._woken.is_set():
            with anyio.CancelScope() as self._fd_wait:
                self._fd_wait.deadline = anyio.current_time() + SIGNAL_PATIENCE_S
                await anyio.wait_readable(self._wake_fd)
            self._fd_wait = None
            with self._signal_lock:  # not woken in time: a signal from now on wakes
                self._wake_at_signal = True
        if not self._signalled:  # (readable before a signal: never; the end decides)
            await self._woken.wait()
        if self._signalled:
            return True
        if self._error is not None:
            raise self._error
        return False

    async def wait(self) -> T:
        """The callable's result, or its exception re-raised.

        Cancelling the wait does not stop the callable: it runs to its end on the worker.
        A call already :attr:`done` is settled here and now (its ``when_done`` callbacks
        run first, as always), not one event-loop turn later.
        """
        if self._done.is_set():
            self._settle()  # the worker's own notice finds it settled
        else:
            await self._finished.wait()
        if self._error is not None:
            raise self._error
        return self._value  # type: ignore[return-value]


class EngineWorker:
    """Runs submitted callables one at a time, in order, on its own thread.

    Construct it on the event loop that will await its calls.
    """

    def __init__(self, name: str) -> None:
        self._on_loop = loop_callback()
        self._jobs: queue.SimpleQueue[ThreadCall[object] | None] = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[[], T]) -> ThreadCall[T]:
        return self._enqueue(ThreadCall(fn, self._on_loop))

    def submit_signalling(
        self, fn: Callable[[Callable[[], None]], T], wake_fd: int | None = None
    ) -> ThreadCall[T]:
        """Run ``fn(signal)``: its call to ``signal()`` wakes whoever awaits
        :meth:`ThreadCall.signalled` (a request prepared, its generation going on).

        With ``wake_fd`` the signal only records: the waiter wakes when that descriptor
        turns readable, which ``fn`` makes happen after signalling (a token ring whose
        loop wakes it on starting, once the worker no longer needs the GIL: waking the
        event loop earlier makes the worker wait for the GIL the loop then holds), or
        when ``fn`` ends; after :data:`SIGNAL_PATIENCE_S` a signal wakes the waiter as
        usual."""
        call: ThreadCall[T] = ThreadCall(lambda: fn(call.signal), self._on_loop, wake_fd)
        return self._enqueue(call)

    def _enqueue(self, call: ThreadCall[T]) -> ThreadCall[T]:
        if self._stopping:
            call._complete(WorkerStopped("the instance's worker has stopped"))
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
        last = self.submit(lambda: None)
        self._stopping = True
        self._jobs.put(None)
        await last.wait()

    def _main(self) -> None:
        while True:
            call = self._jobs.get()
            if call is None:
                break
            call._run()
        # Calls that raced with shutdown() must not hang their waiters.
        while True:
            try:
                leftover = self._jobs.get_nowait()
            except queue.Empty:
                break
            if leftover is not None:
                leftover._complete(WorkerStopped("the instance's worker has stopped"))
