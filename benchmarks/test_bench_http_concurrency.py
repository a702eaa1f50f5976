"""8 concurrent NDJSON streams over 2 models: HTTP and the library against the raw
reference, two plain llama-cpp-python processes each running its model's four
generations one after another (``Llama.generate()``).

modeld uses the C loop, one llama.cpp thread per model, and the same two random-weight
models (fast enough that per-token overhead shows). Rounds rotate HTTP, library and raw
in one run; ratios are medians of per-round ratios. Run:

    python -m pytest benchmarks/test_bench_http_concurrency.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest
from benchmarks.raw_processes import RawProcesses
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

from modeld import InferRequest, ModelManager, Settings

MODELS = ["bench-a.gguf", "bench-b.gguf"]
STREAMS = 8
MAX_TOKENS = 480
ROUNDS = 5
FLAGS = ("--threads", "1", "--n-ctx", "512", "--max-wait-ms", "600000", "--token-loop", "c")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-concurrency")
    for seed, name in enumerate(MODELS):
        spec = TinyModelSpec(n_embd=256, n_ff=768, n_layer=4, seed=seed, context_length=512)
        write_tiny_gguf(directory / name, spec)
    return directory


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    running = start_modeld(models_dir, tmp_path_factory.mktemp("logs"), *FLAGS)
    yield running
    running.stop()


def _body(index: int) -> dict[str, object]:
    return {
        "model": MODELS[index % 2],
        "prompt": f"stream {index}",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }


async def _stream_over_socket(host: str, port: int, index: int) -> int:
    """One NDJSON stream read to its end; returns its completion tokens.

    A lean client (raw socket, the body parsed once at the end) so that the client's CPU,
    on the same two cores as the server, disturbs the measurement as little as possible.
    """
    body = orjson.dumps(_body(index))
    head = (
        f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    received = bytearray()
    async with await anyio.connect_tcp(host, port) as stream:
        await stream.send(head + body)
        try:
            while True:
                received += await stream.receive()
        except anyio.EndOfStream:
            pass
    done_line = received[received.rindex(b'{"done":true') :].split(b"\n", 1)[0]
    return int(orjson.loads(done_line)["metrics"]["completion_tokens"])


async def _http_round(base_url: str) -> float:
    """Aggregate completion tokens per second of STREAMS concurrent NDJSON streams."""
    host, port = base_url.removeprefix("http://").split(":")
    tokens = 0

    async def one(index: int) -> None:
        nonlocal tokens
        completed = await _stream_over_socket(host, int(port), index)
        tokens += completed  # not `tokens += await ...`: that reads `tokens` before awaiting

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for index in range(STREAMS):
            tasks.start_soon(one, index)
    return tokens / (time.perf_counter() - started)


async def _library_round(manager: ModelManager) -> float:
    tokens = 0

    async def one(index: int) -> None:
        nonlocal tokens
        body = _body(index)
        request = InferRequest(
            prompt=str(body["prompt"]), model=str(body["model"]), max_tokens=MAX_TOKENS,
            temperature=0.0,
        )  # fmt: skip
        async with manager.stream(request) as generation:
            async for _ in generation:
                pass
        assert generation.result is not None
        tokens += generation.result.metrics.completion_tokens

    started = time.perf_counter()
    async with anyio.create_task_group() as tasks:
        for index in range(STREAMS):
            tasks.start_soon(one, index)
    return tokens / (time.perf_counter() - started)


def test_http_streams_vs_raw_processes(
    benchmark: BenchmarkFixture, server: RunningServer, models_dir: Path
) -> None:
    settings = Settings(models_dir=models_dir, threads=1, n_ctx=512, max_wait_ms=600_000)
    rounds: list[dict[str, float]] = []

    async def measure(raw: RawProcesses) -> None:
        async with ModelManager(settings) as manager:
            await _library_round(manager)  # load + warm both sides
            await _http_round(server.base_url)
            for round_index in range(ROUNDS):
                order = ["http", "library", "raw"]
                shift = round_index % 3
                figures: dict[str, float] = {}
                for name in order[shift:] + order[:shift]:
                    if name == "http":
                        figures[name] = await _http_round(server.base_url)
                    elif name == "library":
                        figures[name] = await _library_round(manager)
                    else:
                        figures[name] = raw.aggregate(STREAMS // len(MODELS), MAX_TOKENS)
                rounds.append(figures)

    paths = [models_dir / model for model in MODELS]
    with RawProcesses(paths, 512, "stream 0") as raw:
        benchmark.pedantic(lambda: anyio.run(measure, raw), rounds=1, iterations=1)
    for name in ("http", "library", "raw"):
        benchmark.extra_info[f"{name}_tokens_per_s"] = round(
            statistics.median(r[name] for r in rounds), 1
        )
    for name, reference in (("http", "raw"), ("library", "raw"), ("http", "library")):
        benchmark.extra_info[f"{name}_vs_{reference}"] = round(
            statistics.median(r[name] / r[reference] for r in rounds), 3
        )
    print(f"\n8 streams / 2 models: {benchmark.extra_info}")
    assert all(rate > 0 for r in rounds for rate in r.values())
