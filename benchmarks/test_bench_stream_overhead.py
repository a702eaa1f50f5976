"""What modeld adds to llama-cpp-python itself, against RAW references in the same run.

* One 100-token generation on a fast tiny model (one thread): an HTTP stream, an HTTP
  ``stream: false`` answer and the library (``ModelManager.complete``), each against
  ``Llama.generate()`` of the same 100 greedy tokens in this process. Rounds interleave
  the four (their order rotating); the figures are the p50 of each, its difference to
  ``Llama.generate()``'s, and the median of the per-round differences. Goal: the HTTP
  stream within 3 ms of it.
* Two tiny models streaming at once (400 tokens each, one thread each): over HTTP, and
  through the library in this process, against two separate llama-cpp-python processes
  running ``Llama.generate()`` from a common barrier. Aggregate tokens/s per round; the
  ratio is the median of per-round ratios. Goals: HTTP >= 0.90x, library >= 0.97x.

Both modeld sides run with their defaults (prompt reuse on); ``Llama.generate()`` keeps
its own prompt prefix between calls too, so both evaluate the same prompt tokens. Run:

    python -m pytest benchmarks/test_bench_stream_overhead.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from benchmarks.raw_client import infer
from benchmarks.raw_processes import RawProcesses, generate_seconds
from llama_cpp import Llama
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

from modeld import InferRequest, ModelManager, Settings

MODELS = ["fast-a.gguf", "fast-b.gguf"]
N_CTX = 1024
PROMPT = "hello world and the"
SHORT_TOKENS = 100
SHORT_ROUNDS = 60
LONG_TOKENS = 400
PAIR_ROUNDS = 21
FLAGS = ("--threads", "1", "--n-ctx", str(N_CTX), "--max-wait-ms", "600000")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-fast")
    for seed, name in enumerate(MODELS):
        write_tiny_gguf(directory / name, TinyModelSpec(context_length=N_CTX, seed=seed))
    return directory


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_modeld(models_dir, tmp_path_factory.mktemp("logs"), *FLAGS)
    yield running
    running.stop()


def _load(path: Path) -> Llama:
    return Llama(str(path), n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)


def _body(model: str, max_tokens: int, stream: bool = True) -> dict[str, Any]:
    return {
        "model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0,
        "stream": stream,
    }  # fmt: skip


def _request(model: str, max_tokens: int) -> InferRequest:
    return InferRequest(prompt=PROMPT, model=model, max_tokens=max_tokens, temperature=0.0)


def _settings(models_dir: Path) -> Settings:
    return Settings(models_dir=models_dir, threads=1, n_ctx=N_CTX, max_wait_ms=600_000)


# ------------------------------------------------------------------ one short stream


def test_short_stream_overhead_vs_llama_generate(
    benchmark: BenchmarkFixture, server: RunningServer, models_dir: Path
) -> None:
    model = MODELS[0]
    llama = _load(models_dir / model)
    samples: dict[str, list[float]] = {"generate": [], "http": [], "http_whole": [], "library": []}
    lines: list[int] = []

    async def measure() -> None:
        async with ModelManager(_settings(models_dir)) as manager:

            async def library() -> float:
                started = time.perf_counter()
                _, result = await manager.complete(_request(model, SHORT_TOKENS))
                assert result.metrics.completion_tokens == SHORT_TOKENS
                return time.perf_counter() - started

            def http() -> float:
                answer = infer(server.base_url, _body(model, SHORT_TOKENS))
                assert answer.metrics["completion_tokens"] == SHORT_TOKENS
                lines.append(answer.lines)
                return answer.seconds

            def http_whole() -> float:
                answer = infer(server.base_url, _body(model, SHORT_TOKENS, stream=False))
                assert answer.metrics["completion_tokens"] == SHORT_TOKENS
                return answer.seconds

            variants: dict[str, Callable[[], Any]] = {
                "generate": lambda: generate_seconds(llama, PROMPT, SHORT_TOKENS),
                "http": http,
                "http_whole": http_whole,
                "library": library,
            }
            for name in variants:  # warm: loads, first-use costs
                result = variants[name]()
                if name == "library":
                    await result
            names = list(variants)
            for round_index in range(SHORT_ROUNDS):
                shift = round_index % len(names)
                for name in names[shift:] + names[:shift]:
                    result = variants[name]()
                    samples[name].append(await result if name == "library" else result)

    try:
        benchmark.pedantic(lambda: anyio.run(measure), rounds=1, iterations=1)
    finally:
        llama.close()
    p50_ms = {name: statistics.median(values) * 1000 for name, values in samples.items()}
    for name in ("http", "http_whole", "library"):
        benchmark.extra_info[f"{name}_minus_generate_ms"] = round(
            p50_ms[name] - p50_ms["generate"], 3
        )
        # the same, paired within each round: less sensitive to a host that slows down
        benchmark.extra_info[f"{name}_minus_generate_paired_ms"] = round(
            statistics.median(
                (a - b) * 1000 for a, b in zip(samples[name], samples["generate"], strict=True)
            ),
            3,
        )
    benchmark.extra_info.update({f"{k}_p50_ms": round(v, 3) for k, v in p50_ms.items()})
    benchmark.extra_info["http_lines_p50"] = statistics.median(lines)
    print(f"\n{SHORT_TOKENS}-token generation, p50 of {SHORT_ROUNDS}: {benchmark.extra_info}")


# ------------------------------------------------------------------ two models at once


def _http_pair(base_url: str) -> float:
    """Both models' streams at once over HTTP; aggregate tokens/s."""
    start = threading.Barrier(len(MODELS))
    seconds: list[float] = []

    def one(model: str) -> None:
        start.wait()
        answer = infer(base_url, _body(model, LONG_TOKENS))
        assert answer.metrics["completion_tokens"] == LONG_TOKENS
        seconds.append(answer.seconds)

    threads = [threading.Thread(target=one, args=(model,)) for model in MODELS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return len(MODELS) * LONG_TOKENS / max(seconds)


async def _library_pair(manager: ModelManager) -> float:
    async def one(model: str) -> None:
        async with manager.stream(_request(model, LONG_TOKENS)) as generation:
            async for _ in generation:
                pass
        assert generation.result is not None
        assert generation.result.metrics.completion_tokens == LONG_TOKENS

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for model in MODELS:
            tasks.start_soon(one, model)
    return len(MODELS) * LONG_TOKENS / (time.perf_counter() - started)


@pytest.mark.timeout(900)
def test_two_models_streaming_vs_two_raw_processes(
    benchmark: BenchmarkFixture, server: RunningServer, models_dir: Path
) -> None:
    rounds: list[dict[str, float]] = []

    async def measure(raw: RawProcesses) -> None:
        async with ModelManager(_settings(models_dir)) as manager:
            await _library_pair(manager)  # load + warm
            _http_pair(server.base_url)
            for round_index in range(PAIR_ROUNDS):
                order = ["raw", "http", "library"]
                shift = round_index % 3
                figures: dict[str, float] = {}
                for name in order[shift:] + order[:shift]:
                    if name == "raw":
                        figures[name] = raw.aggregate(1, LONG_TOKENS)
                    elif name == "http":
                        figures[name] = _http_pair(server.base_url)
                    else:
                        figures[name] = await _library_pair(manager)
                rounds.append(figures)

    with RawProcesses([models_dir / m for m in MODELS], N_CTX, PROMPT) as raw:
        benchmark.pedantic(lambda: anyio.run(measure, raw), rounds=1, iterations=1)
    for name in ("raw", "http", "library"):
        benchmark.extra_info[f"{name}_tokens_per_s"] = round(
            statistics.median(r[name] for r in rounds), 1
        )
    for name in ("http", "library"):
        benchmark.extra_info[f"{name}_vs_raw"] = round(
            statistics.median(r[name] / r["raw"] for r in rounds), 3
        )
    print(f"\ntwo models x {LONG_TOKENS} tokens, {PAIR_ROUNDS} rounds: {benchmark.extra_info}")
