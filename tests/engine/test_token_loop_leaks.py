"""Leak checks in a fresh interpreter: tracemalloc sees the C extension's allocations too
(PyMem_Raw*), so a per-ring or per-generation leak shows up as growth proportional to the
number of cycles. Every run reports log probabilities, so their records are checked too:
drained, or left for the ring to free."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_SCRIPT = textwrap.dedent(
    """
    import gc, sys, tracemalloc
    from llama_cpp import Llama
    from llama_cpp.llama_grammar import JSON_GBNF
    from modeld.engine.select import token_loop
    from modeld.types import LoopKind, SamplingParams

    llama = Llama(sys.argv[1], n_ctx=512, n_threads=1, verbose=False)
    loop = token_loop(LoopKind.C)
    prompt = llama.tokenize(b"hello world", add_bos=True)
    params = SamplingParams(max_tokens=8, temperature=0.7, seed=1, stop=("zz", "q"), logprobs=3)

    def cycle():
        ring = loop.new_ring(4096)
        ring.push(b"abc", 1)
        ring.drain()
        loop.run(llama, ring, prompt, params)
        ring.drain()
        ring.drain_logprobs()  # taken here; the grammar runs' are freed with their rings
        ring.finish()
        ring.close()
        for grammar in (JSON_GBNF, "root ::= [refused"):  # run, and refused before running
            ring = loop.new_ring(4096)
            loop.run(llama, ring, prompt, params, grammar)
            ring.drain()
            ring.finish()
            ring.close()
        assembler = loop._ext.TextAssembler(["stop", b"\\xff"])
        assembler.feed(b"\\xe6\\x97"); assembler.feed(b"sto"); assembler.flush()

    tracemalloc.start()
    for _ in range(20):
        cycle()
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    for _ in range(500):
        cycle()
    gc.collect()
    print(tracemalloc.get_traced_memory()[0] - before)
    """
)


@pytest.mark.timeout(600)  # 1,560 generations under tracemalloc: a busy machine waits longer
def test_rings_and_generations_do_not_leak(tiny_model_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(tiny_model_path)],
        capture_output=True,
        text=True,
        check=True,
    )
    growth_bytes = int(result.stdout.strip().splitlines()[-1])
    # A leaked ring buffer (4 KiB) or even one leaked pending buffer (64 B) per cycle would
    # grow by 500 times that; some noise from interpreter caches is allowed.
    assert growth_bytes < 16 * 1024, result.stdout
