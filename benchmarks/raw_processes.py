"""The raw reference for several models at once: one plain llama-cpp-python process per
model, each running ``Llama.generate()`` from a common barrier (spawned once, models
loaded once)."""

from __future__ import annotations

import contextlib
import multiprocessing
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from llama_cpp import Llama

from modeld.engine.cpu_quirks import apply_cpu_quirks

apply_cpu_quirks()  # raw references run the kernels modeld's models run

__all__ = ["RawProcesses", "generate_seconds"]

READY_TIMEOUT_S = 120.0


def generate_seconds(llama: Llama, prompt: str, max_tokens: int) -> float:
    """``Llama.generate()`` of ``max_tokens`` greedy tokens, tokenizing included."""
    started = time.perf_counter()
    tokens = llama.generate(llama.tokenize(prompt.encode()), temp=0.0)
    for count, _ in enumerate(tokens, start=1):
        if count >= max_tokens:
            break
    return time.perf_counter() - started


def _serve(path: str, n_ctx: int, prompt: str, start: Any, commands: Connection) -> None:
    """One model's process: on "go", wait at the barrier, run the generations it is sent
    one after another, answer the seconds they took."""
    llama = Llama(path, n_ctx=n_ctx, n_threads=1, n_threads_batch=1, verbose=False)
    generate_seconds(llama, prompt, 8)  # warm-up
    commands.send("ready")
    while (command := commands.recv()) != "stop":
        generations, max_tokens = command
        start.wait()
        started = time.perf_counter()
        for _ in range(generations):
            generate_seconds(llama, prompt, max_tokens)
        commands.send(time.perf_counter() - started)
    llama.close()


class RawProcesses:
    """``with RawProcesses(paths, n_ctx, prompt) as raw: raw.aggregate(...)``."""

    def __init__(self, paths: Sequence[Path], n_ctx: int, prompt: str) -> None:
        context = multiprocessing.get_context("spawn")
        # kept referenced: a collected barrier unlinks its semaphore before a child opens it
        self._start = start = context.Barrier(len(paths))
        self._pipes = [context.Pipe() for _ in paths]
        self._processes = [
            context.Process(target=_serve, args=(str(path), n_ctx, prompt, start, child))
            for path, (_, child) in zip(paths, self._pipes, strict=True)
        ]

    def __enter__(self) -> Self:
        for process in self._processes:
            process.start()
        for parent, _ in self._pipes:
            if not parent.poll(READY_TIMEOUT_S):  # a child that died never answers
                self._stop()
                raise RuntimeError("a raw llama-cpp-python process did not start")
            assert parent.recv() == "ready"
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop()

    def _stop(self) -> None:
        for parent, _ in self._pipes:
            with contextlib.suppress(OSError):
                parent.send("stop")
        for process in self._processes:
            process.join(READY_TIMEOUT_S)
            if process.is_alive():
                process.kill()

    def aggregate(self, generations: int, max_tokens: int) -> float:
        """Every process runs ``generations`` generations of ``max_tokens`` tokens, all
        starting at once: the total tokens over the slowest process's seconds."""
        for parent, _ in self._pipes:
            parent.send((generations, max_tokens))
        slowest = max(parent.recv() for parent, _ in self._pipes)
        return len(self._pipes) * generations * max_tokens / slowest
