"""Token loop benchmarks: per-token overhead, and two models at once in one process.

Every figure that matters is a ratio measured within one run, rounds interleaved, since the
machine is small and shared. Run (ratios are printed and stored in the benchmark JSON):

    python -m pytest benchmarks/test_bench_tokenloop.py --benchmark-only -s

* Overhead: a tiny model (decode ~0.1 ms/token, one thread) generates the same greedy
  tokens through ``Llama.generate()``, the Python loop and the C loop; the ring is large
  enough that the loops never wait for a consumer. Goal: C >= 1.05x ``Llama.generate()``.
* Concurrency: two tiny models, one thread each, generate at once from two worker threads
  of one process (C loop), against the same work in two processes. Goal: >= 0.97x.
"""

from __future__ import annotations

import multiprocessing
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
from llama_cpp import Llama
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

from modeld.engine.base import TokenLoop
from modeld.engine.select import token_loop
from modeld.types import LoopKind, SamplingParams

N_CTX = 2048
TOKENS = 1000
ROUNDS = 15
CONCURRENT_ROUNDS = 15
PARAMS = SamplingParams(max_tokens=TOKENS, temperature=0.0)
RING_BYTES = 1 << 20  # holds a whole generation: no consumer in the overhead benchmark

Variant = Callable[[], int]


def _load(path: Path) -> Llama:
    return Llama(str(path), n_ctx=N_CTX, n_batch=512, n_threads=1, n_threads_batch=1, verbose=False)


def _prompt(llama: Llama) -> list[int]:
    return llama.tokenize(b"hello world and the", add_bos=True)


@pytest.fixture(scope="module")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    directory = tmp_path_factory.mktemp("bench-tiny")
    return [
        write_tiny_gguf(directory / f"tiny-{i}.gguf", TinyModelSpec(context_length=N_CTX, seed=i))
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def tiny_llama(tiny_paths: list[Path]) -> Iterator[Llama]:
    llama = _load(tiny_paths[0])
    yield llama
    llama.close()


def _with_generate(llama: Llama) -> Variant:
    prompt = _prompt(llama)

    def run() -> int:
        count = 0
        for _token in llama.generate(prompt, temp=0.0, reset=True):
            count += 1
            if count >= TOKENS:
                break
        llama.n_tokens = 0
        return count

    return run


def _with_loop(loop: TokenLoop, llama: Llama) -> Variant:
    prompt = _prompt(llama)

    def run() -> int:
        ring = loop.new_ring(RING_BYTES)
        outcome = loop.run(llama, ring, prompt, PARAMS)
        ring.drain()
        ring.close()
        return outcome.completion_tokens

    return run


def _variants(llama: Llama) -> dict[str, Variant]:
    return {
        "generate": _with_generate(llama),
        "python": _with_loop(token_loop(LoopKind.PYTHON), llama),
        "c": _with_loop(token_loop(LoopKind.C), llama),
    }


def _tokens_per_second(variant: Variant) -> float:
    started = time.perf_counter()
    tokens = variant()
    elapsed = time.perf_counter() - started
    assert tokens == TOKENS
    return tokens / elapsed


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", ["generate", "python", "c"])
def test_decode_speed(benchmark: Any, tiny_llama: Llama, name: str) -> None:
    """pytest-benchmark's own statistics for each variant (time per 1000-token generation)."""
    variant = _variants(tiny_llama)[name]
    variant()  # warm-up
    tokens = benchmark.pedantic(variant, rounds=ROUNDS, iterations=1)
    assert tokens == TOKENS


@pytest.mark.timeout(600)
def test_decode_speed_ratios(benchmark: Any, tiny_llama: Llama) -> None:
    """The three variants in interleaved rounds: medians, and medians of per-round ratios.

    A ratio taken within one round compares runs a fraction of a second apart, so it is
    far less sensitive to a noisy neighbour than a ratio of two medians.
    """
    variants = _variants(tiny_llama)
    for variant in variants.values():
        variant()  # warm-up
    names = list(variants)

    def measure() -> list[dict[str, float]]:
        rounds = []
        for round_index in range(ROUNDS):
            shift = round_index % len(names)  # rotate, so that no variant always goes first
            rounds.append(
                {n: _tokens_per_second(variants[n]) for n in names[shift:] + names[:shift]}
            )
        return rounds

    rounds = benchmark.pedantic(measure, rounds=1, iterations=1)
    medians = {n: statistics.median(r[n] for r in rounds) for n in names}
    ratios = {
        f"{a}_vs_{b}": statistics.median(r[a] / r[b] for r in rounds)
        for a, b in [("c", "generate"), ("python", "generate"), ("c", "python")]
    }
    benchmark.extra_info.update({f"{k}_tokens_per_s": v for k, v in medians.items()})
    benchmark.extra_info.update(ratios)
    print(f"\ntokens/s (median of {ROUNDS} rounds): {medians}\nper-round ratios: {ratios}")


# ------------------------------------------------------------------ concurrency


def _one_generation(loop: TokenLoop, llama: Llama, start: Any) -> float:
    """Wait at the start barrier, generate, return the seconds from the barrier to the end."""
    prompt = _prompt(llama)
    ring = loop.new_ring(RING_BYTES)
    start.wait()
    started = time.perf_counter()
    outcome = loop.run(llama, ring, prompt, PARAMS)
    elapsed = time.perf_counter() - started
    ring.close()
    assert outcome.completion_tokens == TOKENS
    return elapsed


def _process_worker(path: str, start: Any, commands: Connection) -> None:
    """A process holding one model: one generation per command, answering its seconds."""
    llama = _load(Path(path))
    loop = token_loop(LoopKind.C)
    _one_generation(loop, llama, threading.Barrier(1))  # warm-up
    commands.send("ready")
    while commands.recv() == "go":
        commands.send(_one_generation(loop, llama, start))
    llama.close()


def _threads_round(loop: TokenLoop, models: list[Llama]) -> float:
    start = threading.Barrier(len(models))
    elapsed: list[float] = []
    threads = [
        threading.Thread(target=lambda m=m: elapsed.append(_one_generation(loop, m, start)))
        for m in models
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(models) * TOKENS / max(elapsed)


@pytest.mark.timeout(600)
def test_two_models_threads_vs_processes(benchmark: Any, tiny_paths: list[Path]) -> None:
    """Aggregate tokens/s: two worker threads in one process vs two processes."""
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(len(tiny_paths))
    pipes = [context.Pipe() for _ in tiny_paths]
    processes = [
        context.Process(target=_process_worker, args=(str(path), start, child))
        for path, (_, child) in zip(tiny_paths, pipes, strict=True)
    ]
    for process in processes:
        process.start()
    assert [parent.recv() for parent, _ in pipes] == ["ready"] * len(pipes)

    def processes_round() -> float:
        for parent, _ in pipes:
            parent.send("go")
        return len(pipes) * TOKENS / max(parent.recv() for parent, _ in pipes)

    models = [_load(path) for path in tiny_paths]
    loop = token_loop(LoopKind.C)
    _threads_round(loop, models)  # warm-up

    def measure() -> list[tuple[float, float]]:
        rounds = []
        for round_index in range(CONCURRENT_ROUNDS):
            if round_index % 2:  # alternate which goes first
                procs = processes_round()
                rounds.append((_threads_round(loop, models), procs))
            else:
                rounds.append((_threads_round(loop, models), processes_round()))
        return rounds

    try:
        rounds = benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:
        for parent, _ in pipes:
            parent.send("stop")
        for process in processes:
            process.join()
        for llama in models:
            llama.close()
    medians = {
        "threads": statistics.median(t for t, _ in rounds),
        "processes": statistics.median(p for _, p in rounds),
    }
    ratio = statistics.median(t / p for t, p in rounds)
    benchmark.extra_info.update({f"{k}_tokens_per_s": v for k, v in medians.items()})
    benchmark.extra_info["threads_vs_processes"] = ratio
    print(
        f"\naggregate tokens/s (median of {CONCURRENT_ROUNDS} rounds): {medians}\n"
        f"per-round ratio threads/processes: {ratio:.3f}"
    )
