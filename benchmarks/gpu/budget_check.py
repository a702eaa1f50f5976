"""The memory budget on a real device: estimates against measurement, the budget across
loads and evictions, memory given back after unload, and decode speed.

On a GPU build the memory is VRAM read through NVML (per process); on a CPU build the same
script measures RSS, which is how it is dry-run before a GPU is used. Run::

    python benchmarks/gpu/budget_check.py --work /tmp/budget --out "$OUT"            # GPU
    python benchmarks/gpu/budget_check.py --work /tmp/budget --out /tmp/o --scale small

Phases (each writes ``results.json`` as soon as it ends, so a run cut short keeps what
it measured):

1. models: random-weight f16 llamas of realistic size (1-1.7 GB) and a tiny one;
2. budget: ``modeld serve`` with the three big models and a budget that holds any two of
   their estimates but not all three; loads, long prompts, evictions and unloads through
   HTTP while a sampler reads the server's memory every 10 ms;
3. calibration: each model alone in a fresh process (``calibrate.py``), its memory after
   load, after one token and after a full context, against the estimate's parts and
   llama.cpp's own buffer sizes;
4. decode: tokens/s over HTTP (C loop and Python loop servers) against
   ``Llama.generate()`` on the same device, and the two loops in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
from gguf_llama import LlamaShape, write_llama_gguf

from modeld.gguf import read_gguf_header
from modeld.memory.estimate import FootprintEstimate, estimate_footprint
from modeld.memory.probe import NvmlProbe, RssProbe

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout: tests.support
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

MIB = 1 << 20
HERE = Path(__file__).resolve().parent
_BUFFER_LINE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS) buffer size\s*=\s*([\d.]+) MiB")

SHAPES = {
    "gpu": {
        "big-a": LlamaShape(n_embd=2048, n_layer=16, n_head=32, n_head_kv=8, n_ff=5632, seed=1),
        "big-b": LlamaShape(n_embd=2048, n_layer=8, n_head=32, n_head_kv=8, n_ff=5632, seed=2),
        "big-c": LlamaShape(
            n_embd=1536, n_layer=20, n_head=12, n_head_kv=4, n_ff=4096, n_vocab=49152, seed=3
        ),
    },
    "small": {  # the CPU dry run: same code, ~20-60 MB models
        "big-a": LlamaShape(n_embd=512, n_layer=8, n_head=8, n_head_kv=2, n_ff=1408, seed=1),
        "big-b": LlamaShape(n_embd=512, n_layer=4, n_head=8, n_head_kv=2, n_ff=1408, seed=2),
        "big-c": LlamaShape(
            n_embd=384, n_layer=6, n_head=6, n_head_kv=2, n_ff=1024, n_vocab=16384, seed=3
        ),
    },
}


@dataclass
class Settings:
    scale: str
    gpu: bool
    n_ctx: int
    n_batch: int = 512
    threads: int = 4
    margin_mb: int = 512
    decode_tokens: int = 256
    decode_rounds: int = 5
    c_loop: bool = True  # the C extension built and binds to this llama.cpp


@dataclass
class Results:
    device: dict[str, Any]
    settings: dict[str, Any]
    models: dict[str, Any] = field(default_factory=dict)
    budget: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    decode: dict[str, Any] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- measuring


def memory_of(pid: int, gpu: bool) -> Callable[[], int]:
    """Bytes that process ``pid`` uses on the budgeted device: NVML or RSS."""
    probe = NvmlProbe(pid=pid) if gpu else RssProbe(trim=False, proc_dir=f"/proc/{pid}")
    return probe.used_bytes


class Sampler:
    """Reads a process's memory every ``period_s`` in a thread; keeps the peak per step."""

    def __init__(self, read: Callable[[], int], period_s: float = 0.01) -> None:
        self._read = read
        self._period_s = period_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._step_peak = 0
        self.peak = 0
        self.samples = 0
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                value = self._read()
            except Exception as exc:  # a probe error is a finding, not a crash
                if len(self.errors) < 5:
                    self.errors.append(repr(exc))
                value = 0
            with self._lock:
                self.samples += 1
                self._step_peak = max(self._step_peak, value)
                self.peak = max(self.peak, value)
            self._stop.wait(self._period_s)

    def take_step_peak(self) -> int:
        with self._lock:
            peak, self._step_peak = self._step_peak, 0
        return peak


def device_info(gpu: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "gpu_offload": gpu,
        "llama_cpp_python": llama_cpp.__version__,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    if gpu:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        name = pynvml.nvmlDeviceGetName(handle)
        info["name"] = name.decode() if isinstance(name, bytes) else name
        info["memory_total_mib"] = pynvml.nvmlDeviceGetMemoryInfo(handle).total // MIB
        info["driver"] = str(pynvml.nvmlSystemGetDriverVersion())
        pynvml.nvmlShutdown()
    return info


def mib(nbytes: float) -> float:
    return round(nbytes / MIB, 1)


# --------------------------------------------------------------------------- phase 1


def write_models(directory: Path, scale: str, results: Results) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for name, shape in SHAPES[scale].items():
        path = directory / f"{name}.gguf"
        started = time.perf_counter()
        if not path.exists():
            write_llama_gguf(path, shape)
        paths[name] = path
        results.models[name] = {
            "file_mib": mib(path.stat().st_size),
            "shape": asdict(shape),
            "write_s": round(time.perf_counter() - started, 2),
        }
    tiny = directory.parent / "tiny" / "tiny-a.gguf"
    tiny.parent.mkdir(parents=True, exist_ok=True)
    paths["tiny-a"] = write_tiny_gguf(tiny, TinyModelSpec(seed=0))
    results.models["tiny-a"] = {"file_mib": mib(tiny.stat().st_size), "shape": "TinyModelSpec()"}
    return paths


def estimate(
    path: Path, settings: Settings, n_ctx: int | None = None, n_gpu_layers: int = -1
) -> FootprintEstimate:
    header = read_gguf_header(path)
    return estimate_footprint(
        header,
        n_ctx=min(n_ctx or settings.n_ctx, header.context_length),
        n_gpu_layers=n_gpu_layers,
        n_batch=settings.n_batch,
        gpu=settings.gpu,
    )


def estimate_parts(est: FootprintEstimate) -> dict[str, float]:
    return {
        "weights": mib(est.weights_bytes),
        "kv": mib(est.kv_cache_bytes),
        "compute": mib(est.compute_bytes),
        "overhead": mib(est.overhead_bytes),
        "total": mib(est.total_bytes),
    }


# --------------------------------------------------------------------------- phase 2


class Client:
    def __init__(self, server: RunningServer) -> None:
        self.server = server
        self.http = server.client(timeout_s=600)

    def status(self) -> dict[str, Any]:
        return dict(self.http.get("/status").json())

    def load(self, model: str) -> dict[str, Any]:
        response = self.http.post(f"/models/{model}/load")
        return {"status": response.status_code, "body": response.json()}

    def unload(self, model: str) -> int:
        return self.http.delete(f"/models/{model}/instance").status_code

    def infer(self, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": False,
        }
        response = self.http.post("/infer", json=body)
        record = dict(response.json())
        record["http_status"] = response.status_code
        record.pop("text", None)
        return record


def charges_mib(status: dict[str, Any]) -> dict[str, float]:
    return {i["model_id"]: i["est_vram_mb"] for i in status["instances"] if i["state"] == "ready"}


def budget_phase(paths: dict[str, Path], settings: Settings, work: Path, results: Results) -> None:
    big = ["big-a", "big-b", "big-c"]
    estimates = {name: estimate(paths[name], settings) for name in big}
    totals = sorted(e.total_bytes for e in estimates.values())
    # any two estimates fit the limit, all three do not
    limit_bytes = totals[1] + totals[2] + totals[0] // 2
    budget_mb = math.ceil(limit_bytes / MIB) + settings.margin_mb
    models_dir = work / "served"
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in big:
        target = models_dir / f"{name}.gguf"
        if not target.exists():
            os.link(paths[name], target)
    long_prompt = "a" * (settings.n_ctx - 128)
    record: dict[str, Any] = {
        "budget_mb": budget_mb,
        "margin_mb": settings.margin_mb,
        "estimates_mib": {name: estimate_parts(e) for name, e in estimates.items()},
        "sum_of_estimates_mib": mib(sum(totals)),
        "steps": [],
    }
    results.budget = record
    server = start_modeld(
        models_dir,
        work,
        "--vram-budget-mb", str(budget_mb), "--vram-margin-mb", str(settings.margin_mb),
        "--n-ctx", str(settings.n_ctx), "--n-batch", str(settings.n_batch),
        "--threads", str(settings.threads), "--max-wait-ms", "600000",
        "--token-loop", "c" if settings.c_loop else "python",
    )  # fmt: skip
    client = Client(server)
    read = memory_of(server.process.pid, settings.gpu)
    try:
        with Sampler(read) as sampler:

            def step(name: str, action: Callable[[], Any]) -> None:
                before = read()
                started = time.perf_counter()
                outcome = action()
                elapsed = time.perf_counter() - started
                after = read()
                status = client.status()
                charges = charges_mib(status)
                record["steps"].append(
                    {
                        "step": name,
                        "seconds": round(elapsed, 2),
                        "outcome": outcome,
                        "measured_before_mib": mib(before),
                        "measured_after_mib": mib(after),
                        "measured_delta_mib": mib(after - before),
                        "peak_during_mib": mib(max(sampler.take_step_peak(), after)),
                        "charges_mib": charges,
                        "sum_charges_mib": round(sum(charges.values()), 1),
                        "used_est_mb": status["used_est_mb"],
                        "evictions": {
                            i["model_id"]: i["evictions_total"] for i in status["instances"]
                        },
                    }
                )
                print(f"  {name:<28} measured {mib(after):9.1f} MiB  charges {charges}")

            def model(name: str) -> str:
                return f"{name}.gguf"

            step("start", lambda: None)
            for name in big:  # the third load must evict the least recently used (big-a)
                step(f"load {name}", lambda n=name: client.load(model(n))["status"])
                step(f"long prompt {name}", lambda n=name: client.infer(model(n), long_prompt, 16))
            step("infer big-a (reload)", lambda: client.infer(model("big-a"), "hello", 16))
            step("long prompt big-a", lambda: client.infer(model("big-a"), long_prompt, 16))
            for name in big:
                step(f"unload {name}", lambda n=name: client.unload(model(n)))
            step("reload big-b", lambda: client.load(model("big-b"))["status"])
            step("long prompt big-b", lambda: client.infer(model("big-b"), long_prompt, 16))
            step("unload big-b again", lambda: client.unload(model("big-b")))
            record["sampler"] = {
                "samples": sampler.samples,
                "peak_mib": mib(sampler.peak),
                "errors": sampler.errors,
            }
        record["final_status"] = client.status()
        record["memory_probe"] = record["final_status"]["memory_probe"]
    finally:
        server.stop()
        record["server_log_tail"] = server.log()[-4000:]
    _budget_checks(record, results)


def _budget_checks(record: dict[str, Any], results: Results) -> None:
    """The promise (the process never uses more than the budget) and the bookkeeping
    behind it: what the process uses above its pre-load baseline and the charges do not
    cover must fit in the margin; the third model evicts the least recently used one;
    what an unloaded instance used comes back."""
    steps = {s["step"]: s for s in record["steps"]}
    budget_mib, margin_mib = record["budget_mb"], record["margin_mb"]
    baseline = steps["start"]["measured_after_mib"]
    for s in record["steps"]:  # used_est_mb: every charge, the process's own one included
        s["uncharged_mib"] = round(s["measured_after_mib"] - baseline - s["used_est_mb"], 1)
    record["max_uncharged_mib"] = max(s["uncharged_mib"] for s in record["steps"])
    results.checks["peak within budget (sampled every 10 ms)"] = record["sampler"][
        "peak_mib"
    ] <= budget_mib and all(s["peak_during_mib"] <= budget_mib for s in record["steps"])
    results.checks["uncharged memory within the margin"] = record["max_uncharged_mib"] <= margin_mib
    after_third = steps["load big-c"]["charges_mib"]
    results.checks["third load evicted the least recently used model"] = (
        "big-a.gguf" not in after_third and {"big-b.gguf", "big-c.gguf"} <= set(after_third)
    )
    first_empty = steps["unload big-c"]["measured_after_mib"]
    second_empty = steps["unload big-b again"]["measured_after_mib"]
    record["residual_after_unload_mib"] = [
        round(first_empty - baseline, 1),
        round(second_empty - baseline, 1),
    ]
    results.checks["memory returns after unload (residual stable within 64 MiB)"] = (
        abs(second_empty - first_empty) <= 64
    )


# --------------------------------------------------------------------------- phase 3


def calibrate(path: Path, settings: Settings, n_ctx: int, n_gpu_layers: int) -> dict[str, Any]:
    command = [
        sys.executable, str(HERE / "calibrate.py"), str(path),
        "--n-ctx", str(n_ctx), "--n-batch", str(settings.n_batch),
        "--n-gpu-layers", str(n_gpu_layers), "--threads", str(settings.threads),
    ] + (["--gpu"] if settings.gpu else [])  # fmt: skip
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    lines = [x for x in completed.stdout.splitlines() if x.startswith("CALIBRATION ")]
    if completed.returncode != 0 or not lines:
        return {"error": completed.stderr[-3000:], "returncode": completed.returncode}
    report: dict[str, Any] = json.loads(lines[-1].removeprefix("CALIBRATION "))
    buffers: dict[str, float] = {}
    for device, kind, size in _BUFFER_LINE.findall(completed.stderr):
        key = f"{device} {kind}"
        buffers[key] = round(buffers.get(key, 0.0) + float(size), 2)
    report["llama_buffers_mib"] = buffers
    report["log_lines"] = [
        x
        for x in completed.stderr.splitlines()
        if "buffer size" in x or "offload" in x or "CUDA" in x or "ggml_cuda" in x
    ][:40]
    return report


def calibration_cases(
    paths: dict[str, Path], settings: Settings
) -> list[tuple[str, Path, int, int]]:
    """(label, model, n_ctx, n_gpu_layers): every model fully offloaded at the server's
    n_ctx, plus a partial offload and a shorter context to test those terms."""
    cases = [
        (name, path, min(settings.n_ctx, read_gguf_header(path).context_length), -1)
        for name, path in paths.items()
    ]
    if settings.gpu:
        half = SHAPES[settings.scale]["big-a"].n_layer // 2
        cases.append((f"big-a ngl={half}", paths["big-a"], settings.n_ctx, half))
        cases.append(("big-b ctx=1024", paths["big-b"], 1024, -1))
    return cases


def calibration_phase(paths: dict[str, Path], settings: Settings, results: Results) -> None:
    for label, path, n_ctx, n_gpu_layers in calibration_cases(paths, settings):
        report = calibrate(path, settings, n_ctx, n_gpu_layers)
        est = estimate(path, settings, n_ctx, n_gpu_layers)
        report["n_ctx"], report["n_gpu_layers"] = n_ctx, n_gpu_layers
        report["estimate_mib"] = estimate_parts(est)
        samples = report.get("samples")
        if samples:
            warm = samples["warm"] - samples["start"]
            filled = samples["filled"] - samples["start"]
            report["warm_over_estimate"] = round(warm / est.total_bytes, 3)
            report["filled_over_estimate"] = round(filled / est.total_bytes, 3)
            report["closed_residual_mib"] = mib(samples["closed"] - samples["start"])
        results.calibration[label] = report
        brief = {k: v for k, v in report.items() if k not in ("log_lines", "error")}
        print(f"  {label:<16} {json.dumps(brief)}", flush=True)
        if "error" in report:
            print(f"  {label} failed: {report['error'][-1500:]}")


# --------------------------------------------------------------------------- phase 4


DECODE_PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."


def http_decode(server: RunningServer, model: str, tokens: int) -> float:
    """Tokens/s after the first streamed chunk (one orjson-free parse per line)."""
    body = {"model": model, "prompt": DECODE_PROMPT, "max_tokens": tokens, "temperature": 0}
    first_at = last_at = 0.0
    after_first = 0
    with (
        httpx.Client(base_url=server.base_url, timeout=600) as http,
        http.stream("POST", "/infer", json=body) as response,
    ):
        for line in response.iter_lines():
            if not line.startswith("{"):
                continue
            now = time.perf_counter()
            record = json.loads(line)
            if record.get("done"):
                break
            if not first_at:
                first_at = now
            else:
                after_first += int(record["tokens"])
            last_at = now
    return after_first / (last_at - first_at)


def generate_decode(llama: Any, tokens: int) -> float:
    """``Llama.generate()`` timed the same way: from its first token."""
    prompt = llama.tokenize(DECODE_PROMPT.encode(), add_bos=True)
    first_at = last_at = 0.0
    count = 0
    for _token in llama.generate(prompt, temp=0.0, reset=True):
        now = time.perf_counter()
        count += 1
        if count == 1:
            first_at = now
        last_at = now
        if count >= tokens:
            break
    llama.n_tokens = 0
    return (count - 1) / (last_at - first_at)


def loop_decode(loop: Any, llama: Any, tokens: int) -> float:
    """A token loop in-process, whole generation timed (prompt included, as for generate)."""
    from modeld.types import SamplingParams

    prompt = llama.tokenize(DECODE_PROMPT.encode(), add_bos=True)
    ring = loop.new_ring(1 << 20)
    started = time.perf_counter()
    outcome = loop.run(llama, ring, prompt, SamplingParams(max_tokens=tokens, temperature=0.0))
    elapsed = time.perf_counter() - started
    ring.drain()
    ring.close()
    if outcome.completion_tokens != tokens:
        raise RuntimeError(f"loop stopped early: {outcome}")
    return tokens / elapsed


def generate_whole(llama: Any, tokens: int) -> float:
    prompt = llama.tokenize(DECODE_PROMPT.encode(), add_bos=True)
    started = time.perf_counter()
    count = 0
    for _token in llama.generate(prompt, temp=0.0, reset=True):
        count += 1
        if count >= tokens:
            break
    elapsed = time.perf_counter() - started
    llama.n_tokens = 0
    return count / elapsed


@contextmanager
def serving(models_dir: Path, work: Path, settings: Settings, loop: str) -> Iterator[RunningServer]:
    server = start_modeld(
        models_dir, work,
        "--n-ctx", str(settings.n_ctx), "--n-batch", str(settings.n_batch),
        "--threads", str(settings.threads), "--token-loop", loop, "--max-wait-ms", "600000",
    )  # fmt: skip
    try:
        yield server
    finally:
        server.stop()


def decode_phase(paths: dict[str, Path], settings: Settings, work: Path, results: Results) -> None:
    from llama_cpp import Llama

    from modeld.engine.select import token_loop
    from modeld.types import LoopKind

    name = "big-a"
    models_dir = work / "served"
    model = f"{name}.gguf"
    tokens = settings.decode_tokens
    loops = ["c", "python"] if settings.c_loop else ["python"]
    with contextlib.ExitStack() as stack:
        servers = {
            loop: stack.enter_context(serving(models_dir, work, settings, loop)) for loop in loops
        }
        llama = Llama(
            str(paths[name]),
            n_ctx=settings.n_ctx,
            n_batch=settings.n_batch,
            n_ubatch=settings.n_batch,
            n_gpu_layers=-1,
            n_threads=settings.threads,
            n_threads_batch=settings.threads,
            verbose=False,
        )
        stack.callback(llama.close)
        variants: dict[str, Callable[[], float]] = {
            "generate_from_first": lambda: generate_decode(llama, tokens),
            "generate_whole": lambda: generate_whole(llama, tokens),
        }
        for loop, server in servers.items():
            in_process = token_loop(LoopKind(loop))
            variants[f"http_{loop}"] = lambda s=server: http_decode(s, model, tokens)
            variants[f"{loop}_loop_whole"] = lambda t=in_process: loop_decode(t, llama, tokens)
        for variant in variants.values():
            variant()  # warm-up (and the servers' loads)
        names = sorted(variants)
        rounds: list[dict[str, float]] = []
        for index in range(settings.decode_rounds):
            shift = index % len(names)
            rounds.append({n: variants[n]() for n in names[shift:] + names[:shift]})
    medians = {n: round(statistics.median(r[n] for r in rounds), 1) for n in names}
    pairs = [
        ("http_c", "generate_from_first"),
        ("http_python", "generate_from_first"),
        ("c_loop_whole", "generate_whole"),
        ("python_loop_whole", "generate_whole"),
        ("c_loop_whole", "python_loop_whole"),
        ("http_c", "http_python"),
    ]
    ratios = {
        f"{a} / {b}": round(statistics.median(r[a] / r[b] for r in rounds), 3)
        for a, b in pairs
        if a in names and b in names
    }
    results.decode = {
        "model": model,
        "tokens": tokens,
        "rounds": rounds,
        "median_tokens_per_s": medians,
        "ratios": ratios,
    }


# --------------------------------------------------------------------------- report


def print_tables(results: Results) -> None:
    print("\n== device:", json.dumps(results.device))
    budget = results.budget
    if budget:
        print(
            f"\n== budget {budget['budget_mb']} MiB (margin {budget['margin_mb']}), "
            f"sum of estimates {budget['sum_of_estimates_mib']} MiB, "
            f"probe {budget.get('memory_probe')}, peak {budget.get('sampler', {}).get('peak_mib')}"
        )
        print(
            f"{'step':<24}{'measured':>9}{'delta':>8}{'peak':>8}{'budget used':>12}"
            f"{'uncharged':>10}  charges"
        )
        for s in budget["steps"]:
            charges = {k.removesuffix(".gguf"): round(v) for k, v in s["charges_mib"].items()}
            print(
                f"{s['step']:<24}{s['measured_after_mib']:>9}{s['measured_delta_mib']:>8}"
                f"{s['peak_during_mib']:>8}{s['used_est_mb']:>12}"
                f"{s.get('uncharged_mib', ''):>10}  {charges}"
            )
        print("residual after unloading everything (MiB):", budget.get("residual_after_unload_mib"))
    if results.calibration:
        print("\n== per instance, alone in a process (MiB; est = estimate total)")
        print(
            f"{'model':<16}{'est':>8}{'w':>8}{'kv':>7}{'comp':>8}"
            f"{'loaded':>9}{'warm':>9}{'filled':>9}{'again':>9}{'closed':>8}  llama.cpp buffers"
        )
        for name, c in results.calibration.items():
            if "samples" not in c:
                print(f"{name:<16} error: {c.get('error', '')[-300:]}")
                continue
            s, e = c["samples"], c["estimate_mib"]
            base = s["start"]
            print(
                f"{name:<16}{e['total']:>8}{e['weights']:>8}{e['kv']:>7}{e['compute']:>8}"
                f"{mib(s['loaded'] - base):>9}{mib(s['warm'] - base):>9}"
                f"{mib(s['filled'] - base):>9}{mib(s['filled_again'] - base):>9}"
                f"{mib(s['closed'] - base):>8}  "
                f"{c['llama_buffers_mib']}"
            )
    if results.decode:
        print(f"\n== decode, {results.decode['model']}, {results.decode['tokens']} tokens")
        print("median tokens/s:", json.dumps(results.decode["median_tokens_per_s"]))
        print("median per-round ratios:", json.dumps(results.decode["ratios"]))
    print("\n== checks")
    for name, ok in results.checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print("timings (s):", json.dumps(results.timings_s))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scale", choices=sorted(SHAPES), default="gpu")
    parser.add_argument("--phases", default="budget,calibration,decode")
    parser.add_argument("--deadline-s", type=float, default=math.inf)
    args = parser.parse_args()
    deadline = time.monotonic() + args.deadline_s
    gpu = bool(llama_cpp.llama_supports_gpu_offload())
    from modeld.engine.select import token_loop
    from modeld.errors import TokenLoopUnavailable
    from modeld.types import LoopKind

    try:
        token_loop(LoopKind.C)
        c_loop = True
    except TokenLoopUnavailable as exc:
        print(f"C token loop unavailable ({exc}): the Python loop serves")
        c_loop = False
    settings = Settings(
        scale=args.scale,
        gpu=gpu,
        n_ctx=4096 if args.scale == "gpu" else 1024,
        threads=4 if gpu else 2,
        margin_mb=512 if args.scale == "gpu" else 32,  # RSS keeps ~16 MiB of heap
        decode_rounds=5 if args.scale == "gpu" else 3,
        decode_tokens=256 if args.scale == "gpu" else 64,
        c_loop=c_loop,
    )
    results = Results(device=device_info(gpu), settings=asdict(settings))
    args.out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        (args.out / "results.json").write_text(json.dumps(asdict(results), indent=1))

    started = time.perf_counter()
    paths = write_models(args.work / "models", args.scale, results)
    results.timings_s["models"] = round(time.perf_counter() - started, 1)
    save()
    phases: dict[str, Callable[[], None]] = {
        "budget": lambda: budget_phase(paths, settings, args.work, results),
        "calibration": lambda: calibration_phase(paths, settings, results),
        "decode": lambda: decode_phase(paths, settings, args.work, results),
    }
    for phase in args.phases.split(","):
        if time.monotonic() > deadline:
            print(f"== {phase}: skipped (past the deadline)")
            continue
        print(f"== {phase}", flush=True)
        started = time.perf_counter()
        try:
            phases[phase]()
        except Exception as exc:  # keep the other phases' results
            results.checks[f"{phase} ran"] = False
            print(f"{phase} failed: {exc!r}")
            import traceback

            traceback.print_exc()
        results.timings_s[phase] = round(time.perf_counter() - started, 1)
        save()
    print_tables(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
