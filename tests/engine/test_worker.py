"""The worker thread: calls in order, results and errors handed back on the event loop,
cancel-safe waiting, and no file descriptor per call (so it works out of descriptors)."""

from __future__ import annotations

import os
import threading

import anyio
import pytest

from modeld.engine.worker import EngineWorker, WorkerStopped

pytestmark = pytest.mark.anyio


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_calls_run_in_order_on_one_thread() -> None:
    worker = EngineWorker("test-worker")
    seen: list[tuple[int, str]] = []
    calls = [
        worker.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
        for i in range(50)
    ]
    for call in calls:
        await call.wait()
    await worker.shutdown()
    assert [i for i, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {"test-worker"}


async def test_results_and_errors_come_back() -> None:
    worker = EngineWorker("test-worker")
    assert await worker.run(lambda: 42) == 42

    def fail() -> None:
        raise ValueError("from the worker")

    with pytest.raises(ValueError, match="from the worker"):
        await worker.run(fail)
    await worker.shutdown()


async def test_waiting_needs_no_file_descriptor() -> None:
    worker = EngineWorker("test-worker")
    before = open_fds()
    gate = threading.Event()
    blocked = worker.submit(lambda: gate.wait(10))
    calls = [worker.submit(lambda: None) for _ in range(200)]
    assert open_fds() == before  # 201 calls pending, not one descriptor more
    gate.set()
    await blocked.wait()
    for call in calls:
        await call.wait()
    await worker.shutdown()


async def test_a_cancelled_wait_leaves_the_call_running_and_when_done_fires() -> None:
    worker = EngineWorker("test-worker")
    gate, finished = threading.Event(), threading.Event()

    def slow() -> int:
        gate.wait(10)
        finished.set()
        return 1

    call = worker.submit(slow)
    with anyio.move_on_after(0.01):
        await call.wait()
    assert not call.done
    fired = anyio.Event()
    call.when_done(fired.set)
    gate.set()
    with anyio.fail_after(10):
        await fired.wait()
    assert finished.is_set()
    assert await call.wait() == 1
    later = anyio.Event()
    call.when_done(later.set)  # already done: runs at once
    assert later.is_set()
    await worker.shutdown()


async def test_calls_after_shutdown_fail_instead_of_hanging() -> None:
    worker = EngineWorker("test-worker")
    await worker.shutdown()
    await worker.shutdown()  # idempotent
    with anyio.fail_after(5), pytest.raises(WorkerStopped):
        await worker.run(lambda: 1)
