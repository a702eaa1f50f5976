"""Closing an instance gives its memory back, over many load/evict cycles.

Run in a fresh interpreter so that nothing else in the test session moves RSS. Two
~11 MB models in a budget that holds one: every request evicts the other model, so each
cycle is a full load, a generation and an eviction through the real scheduler.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from modeld.sizes import MIB

_SCRIPT = r"""
import json, sys
import anyio
from modeld import InferRequest, ModelManager, Settings
from modeld.memory.probe import RssProbe

models_dir, cycles, loop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
probe = RssProbe()
samples = []

async def main():
    # n_gpu_layers=0: host memory is what this test follows, on a CUDA build too
    settings = Settings(models_dir=models_dir, vram_budget_mb=40, vram_margin_mb=0,
                        n_ctx=256, threads=1, token_loop=loop, n_gpu_layers=0)
    async with ModelManager(settings, probe=probe) as manager:
        for cycle in range(cycles):
            model = "med-a.gguf" if cycle % 2 == 0 else "med-b.gguf"
            request = InferRequest(prompt="hi", model=model, max_tokens=8, temperature=0)
            await manager.complete(request)
            probe.trim()
            samples.append(probe.used_bytes())
        evictions = sum(c.evictions_total for c in manager.counters.values())
    probe.trim()
    print(json.dumps({"samples": samples, "after_close": probe.used_bytes(),
                      "evictions": evictions}))

anyio.run(main)
"""

CYCLES = 40


def test_rss_returns_after_many_load_evict_cycles(
    medium_model_dir: Path, token_loop_kind: str
) -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(medium_model_dir), str(CYCLES), str(token_loop_kind)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    samples = report["samples"]
    assert report["evictions"] == CYCLES - 1  # every cycle after the first evicted the other
    # With one ~11 MB model resident at a time, RSS must not creep from cycle to cycle:
    # compare the second half against the first few cycles (after allocator warm-up).
    settled = max(samples[2:6])
    assert max(samples[CYCLES // 2 :]) - settled < 8 * MIB, samples
