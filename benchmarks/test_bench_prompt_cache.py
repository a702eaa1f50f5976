"""The prompt cache against a fresh evaluation, in the same run, at the engine level.

A random-weight llama (n_embd 256, 4 layers, written by the tests' support code)
stands in for Gemma 3 270M, whose batched decode segfaults in the llama.cpp build of the
machine this was first run on (see docs/benchmarks.md). A ~450-token history is asked,
then displaced by another conversation; the next turn (history + one sentence) is timed
from ``generate()`` to its first token:

* ``fresh``: an engine without reuse or cache evaluates the whole prompt;
* ``restored_memory``: the history comes back from the memory tier;
* ``restored_disk``: a new cache on the same directory (a restart) restores it from disk.

``save``/``restore`` time the state copies alone, reported per MiB.

Run:

    python -m pytest benchmarks/test_bench_prompt_cache.py --benchmark-only -s
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pytest_benchmark.fixture import BenchmarkFixture
from tests.support.prompts import FOLLOW_UP, long_prompt
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf

from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.select import token_loop
from modeld.engine.seq_state import read_state, write_state
from modeld.gguf import FileIdentity
from modeld.prompt_cache.cache import PromptCache
from modeld.prompt_cache.disk_tier import DiskTier
from modeld.prompt_cache.namespace import Namespace
from modeld.sizes import MIB
from modeld.types import LoopKind, SamplingParams

pytestmark = pytest.mark.timeout(600)
PARAMS = SamplingParams(max_tokens=1, temperature=0.0)
RESULTS: dict[str, float] = {}
HISTORY_SENTENCES = 8  # ~450-650 tokens of this tokenizer
Conversation = tuple[list[int], list[int]]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench-cache") / "bench-llama.gguf"
    spec = TinyModelSpec(n_embd=256, n_ff=512, n_layer=4, context_length=2048, seed=3)
    write_tiny_gguf(path, spec)
    return path


def _engine(path: Path, *, reuse: bool) -> LlamaEngine:
    settings = EngineSettings(
        n_ctx=1024, n_batch=512, n_threads=2, n_gpu_layers=0, prompt_reuse=reuse
    )
    return LlamaEngine(path, settings, token_loop(LoopKind.C), 2048)


def _namespace(engine: LlamaEngine, path: Path) -> Namespace:
    s = engine.sizes
    return Namespace.of(path.name, FileIdentity.of(path.stat()), s.n_ctx, s.n_batch, s.n_ubatch)


def _first_token_ms(engine: LlamaEngine, tokens: list[int]) -> tuple[float, int]:
    ring = engine.new_ring(1 << 20)
    try:
        started = time.perf_counter()
        outcome = engine.generate(ring, tokens, PARAMS)
        return (time.perf_counter() - started) * 1000, outcome.cached_tokens
    finally:
        ring.close()


@pytest.fixture(scope="module")
def conversation(model_path: Path) -> Conversation:
    """(the history, another conversation's prompt), tokenized once."""
    engine = _engine(model_path, reuse=False)
    history = engine.tokenize(long_prompt(HISTORY_SENTENCES))
    other = engine.tokenize("A different conversation about the sea. " * 20)
    engine.close()
    assert 400 <= len(history) <= 700, len(history)
    return history, other


def _turn(engine: LlamaEngine, history: list[int]) -> list[int]:
    return [*history, *engine.tokenize(FOLLOW_UP)[1:]]


def test_fresh(benchmark: BenchmarkFixture, model_path: Path, conversation: Conversation) -> None:
    history, _ = conversation
    engine = _engine(model_path, reuse=False)
    try:
        turn = _turn(engine, history)
        _, cached = benchmark.pedantic(lambda: _first_token_ms(engine, turn), rounds=3)
        assert cached == 0
        RESULTS["fresh"] = benchmark.stats.stats.median
    finally:
        engine.close()


@pytest.mark.parametrize("tier", ["memory", "disk"])
def test_restored(
    benchmark: BenchmarkFixture,
    model_path: Path,
    conversation: Conversation,
    tmp_path: Path,
    tier: str,
) -> None:
    history, other = conversation
    engine = _engine(model_path, reuse=True)
    turn = _turn(engine, history)

    rounds = iter(range(1000))

    def setup() -> tuple[tuple[()], dict[str, object]]:
        directory = tmp_path / str(next(rounds))  # nothing left from an earlier round
        cache = PromptCache(256 * MIB, disk=DiskTier(directory, 256 * MIB))
        engine.attach_prompt_cache(cache.for_model(_namespace(engine, model_path)))
        engine.forget_kv()  # not the previous round's turn
        _first_token_ms(engine, history)
        _first_token_ms(engine, other)  # displaces the history: saved
        # the disk writer's work done before the timed turn, not during it
        assert cache.close(60.0) == 0
        if tier == "disk":  # a restart: only the directory is left
            cache = PromptCache(256 * MIB, disk=DiskTier(directory, 256 * MIB))
            engine.attach_prompt_cache(cache.for_model(_namespace(engine, model_path)))
        return (), {}

    try:
        _, cached = benchmark.pedantic(lambda: _first_token_ms(engine, turn), setup=setup, rounds=3)
        assert cached == len(history)
        RESULTS[tier] = benchmark.stats.stats.median
        if "fresh" in RESULTS:
            print(f"\n{tier}: {RESULTS[tier] / RESULTS['fresh']:.3f} x fresh")
    finally:
        engine.attach_prompt_cache(None)
        engine.close()


@pytest.mark.parametrize("direction", ["save", "restore"])
def test_state_copy_per_mib(
    benchmark: BenchmarkFixture,
    model_path: Path,
    conversation: Conversation,
    direction: str,
) -> None:
    history, _ = conversation
    engine = _engine(model_path, reuse=True)
    try:
        _first_token_ms(engine, history)
        llama = engine._llama
        data = read_state(llama, 1 << 30)
        assert data is not None
        n = len(history)
        if direction == "save":
            benchmark(lambda: read_state(llama, 1 << 30))
        else:
            assert benchmark(lambda: write_state(llama, data, n))
        per_mib_ms = benchmark.stats.stats.median * 1000 / (len(data) / MIB)
        print(f"\n{direction}: {len(data) / MIB:.2f} MiB, {per_mib_ms:.3f} ms/MiB")
    finally:
        engine.close()
