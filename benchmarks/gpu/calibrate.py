"""One model in a fresh process: what this process uses at each step of a load and a fill.

Run by ``budget_check.py`` (one process per model, so the CUDA context and the allocator
pools of one model never hide in another's numbers). Prints one ``CALIBRATION {json}``
line on stdout; llama.cpp's own log (``verbose=True``) goes to stderr, where the parent
reads its "buffer size" lines.

Steps, each followed by a sample of this process's memory (NVML on a GPU, RSS on CPU):
``start`` (nothing loaded), ``loaded`` (``Llama()`` returned), ``warm`` (one token
generated: what modeld charges), ``filled`` (a prompt of ``n_ctx - 64`` tokens evaluated
in ``n_batch`` chunks, then 8 tokens: every buffer and pool at its working size),
``filled_again`` (the same prompt once more: a pool that keeps growing shows here),
``closed`` (``close()``: what the process keeps).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
from pathlib import Path

import llama_cpp
from llama_cpp import Llama
from llama_cpp._logger import llama_log_callback

from modeld.memory.probe import NvmlProbe, RssProbe

# modeld's engine (imported with the probe) routes llama.cpp's log through loguru and
# drops its info lines; the "buffer size" lines are what this script is for.
llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def _probe(gpu: bool) -> NvmlProbe | RssProbe:
    return NvmlProbe(pid=os.getpid()) if gpu else RssProbe()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("--n-ctx", type=int, required=True)
    parser.add_argument("--n-batch", type=int, default=512)
    parser.add_argument("--n-gpu-layers", type=int, default=-1)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--gpu", action="store_true")
    args = parser.parse_args()

    probe = _probe(args.gpu)
    samples: dict[str, int] = {"start": probe.used_bytes()}
    started = time.perf_counter()
    llama = Llama(
        str(args.model),
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        n_ubatch=args.n_batch,
        n_gpu_layers=args.n_gpu_layers,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        verbose=True,
    )
    load_s = time.perf_counter() - started
    samples["loaded"] = probe.used_bytes()
    prompt = llama.tokenize(b"hello", add_bos=True)
    next(iter(llama.generate(prompt, temp=0.0, reset=True)))
    samples["warm"] = probe.used_bytes()
    filler = [llama.tokenize(b"a", add_bos=False)[-1]]
    long_prompt = prompt + filler * (args.n_ctx - 64 - len(prompt))
    llama.reset()
    llama.eval(long_prompt)  # n_batch chunks, as llama-cpp-python always does
    for count, _token in enumerate(llama.generate([filler[0]], temp=0.0, reset=False)):
        if count >= 7:
            break
    samples["filled"] = probe.used_bytes()
    llama.reset()
    llama.eval(long_prompt)  # again: pools that keep growing would show here
    samples["filled_again"] = probe.used_bytes()
    model_size_bytes = int(llama._model.size())
    llama.close()
    samples["closed"] = probe.used_bytes()
    report = {
        "model": args.model.name,
        "samples": samples,
        "load_s": round(load_s, 3),
        "prompt_tokens": len(long_prompt),
        "model_size_bytes": model_size_bytes,
        "probe": probe.kind,
    }
    sys.stderr.flush()
    print("CALIBRATION " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
