"""What tracing costs a request: the same requests against a server with tracing off and
one exporting OTLP (to a local receiver that discards), and for ``POST /infer`` the raw
reference, ``Llama.generate()`` of the same tokens in this process.

Tracing adds work per request (a server span; for a generation four children), never
per token, so the measures are per request and as small as they come: ``GET /status``
(the span alone) and a tiny model's 16-token answer. Off, no tracing code is installed
in the request path at all (no middleware, no listener: ``tests/operator/test_tracing.py``
checks it), so "off" is the baseline. Everything runs interleaved, one at a time, on the
same machine; ratios are medians of per-round ratios. Run:

    python -m pytest benchmarks/test_bench_tracing.py --benchmark-only -s
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from llama_cpp import Llama
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

MODEL = "tiny-a.gguf"
PROMPT = "The quick brown fox jumps over the lazy dog"
TOKENS = 16
STATUS_PER_ROUND = 400
INFER_PER_ROUND = 100
ROUNDS = 5
SERVER_FLAGS = ("--threads", "1", "--n-ctx", "256", "--token-loop", "c")


class _Discard(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("bench-tracing-models")
    write_tiny_gguf(directory / MODEL, TinyModelSpec(seed=0))
    return directory


@pytest.fixture(scope="module")
def servers(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningServer]]:
    logs = tmp_path_factory.mktemp("bench-tracing-logs")
    with ThreadingHTTPServer(("127.0.0.1", 0), _Discard) as receiver:
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
        off = start_modeld(models_dir, logs, *SERVER_FLAGS)
        on = start_modeld(
            models_dir, logs, *SERVER_FLAGS, env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint}
        )
        try:
            yield {"off": off, "on": on}
        finally:
            off.stop()
            on.stop()
            receiver.shutdown()


INFER_BODY = json.dumps(
    {"model": MODEL, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0, "stream": False}
)


def requests(server: RunningServer, count: int, infer: bool) -> list[float]:
    """Seconds per request (``/infer`` without streaming, or ``/status``), on one
    kept-alive connection."""
    host, port = server.address
    method, path, body = ("POST", "/infer", INFER_BODY) if infer else ("GET", "/status", None)
    headers = {"Content-Type": "application/json"}
    connection = http.client.HTTPConnection(host, port, timeout=60)
    times = []
    try:
        for _ in range(count):
            started = time.perf_counter()
            connection.request(method, path, body, headers)
            response = connection.getresponse()
            data = response.read()
            times.append(time.perf_counter() - started)
            assert response.status == 200, data
    finally:
        connection.close()
    return times


def reference(llama: Llama, count: int) -> list[float]:
    """``Llama.generate()`` of the same prompt and number of tokens (greedy)."""
    tokens = llama.tokenize(PROMPT.encode(), special=True)
    times = []
    for _ in range(count):
        started = time.perf_counter()
        for produced, _token in enumerate(llama.generate(tokens, temp=0.0, reset=True), 1):
            if produced >= TOKENS:
                break
        times.append(time.perf_counter() - started)
    return times


def test_tracing_cost_per_request(
    benchmark: BenchmarkFixture, servers: dict[str, RunningServer], models_dir: Path
) -> None:
    llama = Llama(str(models_dir / MODEL), n_ctx=256, n_threads=1, n_threads_batch=1,
                  verbose=False)  # fmt: skip
    for server in servers.values():
        requests(server, 20, infer=True)  # load and warm
    reference(llama, 20)
    medians: dict[str, list[float]] = {
        name: [] for name in ("status_off", "status_on", "off", "on", "generate")
    }

    def one_round() -> None:
        for name, server in servers.items():
            medians[f"status_{name}"].append(
                statistics.median(requests(server, STATUS_PER_ROUND, infer=False))
            )
            medians[name].append(statistics.median(requests(server, INFER_PER_ROUND, infer=True)))
        medians["generate"].append(statistics.median(reference(llama, INFER_PER_ROUND)))

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    llama.close()

    def ratio(a: str, b: str) -> float:
        return round(
            statistics.median(x / y for x, y in zip(medians[a], medians[b], strict=True)), 3
        )

    def ms(name: str) -> float:
        return round(statistics.median(medians[name]) * 1000, 3)

    benchmark.extra_info.update(
        {
            "status_off_ms": ms("status_off"),
            "status_on_ms": ms("status_on"),
            "status_on_over_off": ratio("status_on", "status_off"),
            "infer_off_ms": ms("off"),
            "infer_on_ms": ms("on"),
            "infer_on_over_off": ratio("on", "off"),
            "generate_ms": ms("generate"),
            "infer_off_over_generate": ratio("off", "generate"),
        }
    )
    print(f"\n{benchmark.extra_info}")
    assert all(m > 0 for m in medians["off"])
