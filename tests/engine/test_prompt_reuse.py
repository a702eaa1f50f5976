"""Prompt-prefix reuse (engine/kv_prefix.py and keep_cached_prefix() in csrc/loop.h).

An engine that keeps its KV cache between generations must answer every prompt exactly
as an engine that evaluates each prompt afresh (``prompt_reuse=False``), on both loops,
on a plain tiny llama, a tiny Gemma 3 (sliding-window layers) and the real Gemma.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from llama_cpp import Llama

from modeld.engine.base import LoopOutcome, StopCode, TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.types import LoopKind, SamplingParams
from tests.support.engine import run_paused_in_prompt, stream
from tests.support.prompts import FOLLOW_UP, long_prompt
from tests.support.tiny_gemma3 import write_tiny_gemma3_gguf

GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
# Two Gemma engines evaluate a long prompt three times on 2 threads: about a minute on an
# idle 2-core machine, past the suite's 120 s on a busy one. A slow machine waits longer.
GEMMA_TIMEOUT_S = 900
SEEDED = SamplingParams(max_tokens=24, temperature=0.9, top_k=50, top_p=0.9, seed=77)


@pytest.fixture(scope="module")
def tiny_gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("tiny-gemma3") / "tiny-g3.gguf")


def _engine(path: Path, loop: TokenLoop, *, reuse: bool, threads: int = 1) -> LlamaEngine:
    settings = EngineSettings(
        n_ctx=1024, n_batch=64, n_threads=threads, n_gpu_layers=0, prompt_reuse=reuse
    )
    return LlamaEngine(path, settings, loop, 2048)


@pytest.fixture(params=["tiny-llama", "tiny-gemma3"])
def engines(
    request: pytest.FixtureRequest, loop: TokenLoop, tiny_model_path: Path, tiny_gemma3_path: Path
) -> Iterator[tuple[LlamaEngine, LlamaEngine]]:
    """(an engine that reuses prompt prefixes, one that never does) on the same model."""
    path = tiny_model_path if request.param == "tiny-llama" else tiny_gemma3_path
    reusing, fresh = _engine(path, loop, reuse=True), _engine(path, loop, reuse=False)
    yield reusing, fresh
    reusing.close()
    fresh.close()


def answer(
    engine: LlamaEngine, tokens: list[int], params: SamplingParams = GREEDY
) -> tuple[bytes, LoopOutcome]:
    ring = engine.new_ring(1 << 20)  # never full: the generation runs on this thread
    try:
        outcome = engine.generate(ring, tokens, params)
        text, _, finished = ring.drain()
        assert finished
        return text, outcome
    finally:
        ring.close()


def words(engine: LlamaEngine, text: str) -> list[int]:
    """Tokens of ``text`` to append to a prompt (no BOS)."""
    return engine.tokenize(text)[1:]


def same_answer(
    reusing: LlamaEngine,
    fresh: LlamaEngine,
    tokens: list[int],
    params: SamplingParams = GREEDY,
) -> LoopOutcome:
    """Ask both engines; assert the answers are identical; the reusing one's outcome."""
    text, outcome = answer(reusing, tokens, params)
    fresh_text, fresh_outcome = answer(fresh, tokens, params)
    assert fresh_outcome.cached_tokens == 0
    assert outcome.stop_code is fresh_outcome.stop_code is StopCode.LENGTH
    assert text == fresh_text
    assert outcome.completion_tokens == fresh_outcome.completion_tokens
    return outcome


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_conversation_answers_as_fresh_evaluations_do(
    engines: tuple[LlamaEngine, LlamaEngine], params: SamplingParams
) -> None:
    reusing, fresh = engines
    first = reusing.tokenize("hello world and the")
    assert same_answer(reusing, fresh, first, params).cached_tokens == 0

    # the same prompt again: all but its last token, whose logits the first sample needs
    assert same_answer(reusing, fresh, first, params).cached_tokens == len(first) - 1

    # the prompt grown by some text: at least the whole first prompt
    grown = first + words(reusing, " world and the hello")
    outcome = same_answer(reusing, fresh, grown, params)
    assert outcome.cached_tokens >= len(first)
    # the KV holds the prompt and every sampled token but the last (never decoded)
    assert outcome.kv_tokens is not None
    assert len(outcome.kv_tokens) == len(grown) + params.max_tokens - 1
    assert list(outcome.kv_tokens[: len(grown)]) == grown

    # the whole exchange so far plus a new line, as a chat resends it: all of it is kept
    exchange = [*outcome.kv_tokens, *words(reusing, " and the world")]
    assert same_answer(reusing, fresh, exchange, params).cached_tokens == len(outcome.kv_tokens)

    # a prompt that parts from the cache early: only the tokens before the parting
    other = reusing.tokenize("the world")
    # the cache starts with the exchange
    shared = next(i for i, (a, b) in enumerate(zip(exchange, other, strict=False)) if a != b)
    assert 1 <= shared < len(first)
    assert same_answer(reusing, fresh, other, params).cached_tokens == shared


def test_nothing_is_reused_after_the_warm_up(tiny_model_path: Path, loop: TokenLoop) -> None:
    engine = _engine(tiny_model_path, loop, reuse=True)
    try:
        engine.warm_up()
        _, outcome = answer(engine, engine.tokenize("warm up the world"))
        assert outcome.cached_tokens == 0
    finally:
        engine.close()


def test_a_cancelled_generation_keeps_only_what_was_evaluated(
    engines: tuple[LlamaEngine, LlamaEngine],
) -> None:
    reusing, fresh = engines
    first = reusing.tokenize("hello world")
    answer(reusing, first)
    grown = first + words(reusing, " and the world")
    ring = reusing.new_ring()
    ring.cancel()  # before the loop starts: it keeps the prefix, then stops
    outcome = reusing.generate(ring, grown, GREEDY)
    ring.close()
    assert outcome.stop_code is StopCode.CANCELLED
    assert outcome.cached_tokens >= len(first)
    assert outcome.kv_tokens == grown[: outcome.cached_tokens]
    assert same_answer(reusing, fresh, grown).cached_tokens == outcome.cached_tokens


def test_a_failed_generation_leaves_nothing_to_reuse(
    engines: tuple[LlamaEngine, LlamaEngine],
) -> None:
    reusing, fresh = engines
    prompt = reusing.tokenize("hello world and the")
    answer(reusing, prompt)
    too_long = prompt + [prompt[-1]] * reusing.n_ctx  # past prepare(): the decode fails
    _, failed = answer(reusing, too_long)
    assert failed.stop_code is StopCode.ERROR
    assert failed.kv_tokens is None
    assert same_answer(reusing, fresh, prompt).cached_tokens == 0


def test_cached_must_leave_a_token_to_evaluate(loop: TokenLoop, tiny_llama: Llama) -> None:
    prompt = tiny_llama.tokenize(b"hello world")
    for cached in (-1, len(prompt)):
        ring = loop.new_ring()
        with pytest.raises(ValueError, match="at least one prompt token"):
            loop.run(tiny_llama, ring, prompt, GREEDY, cached=cached)
        ring.close()


def test_a_decode_cancelled_inside_the_prompt_leaves_no_known_kv(
    loop: TokenLoop, tiny_llama: Llama
) -> None:
    prompt = tiny_llama.tokenize(b"hello world and the") * 40
    outcome, _ = run_paused_in_prompt(loop, tiny_llama, prompt, GREEDY)
    assert outcome.stop_code is StopCode.CANCELLED
    if loop.kind is LoopKind.C:
        assert outcome.kv_tokens is None  # aborted inside llama_decode: the next one clears
    else:
        assert outcome.kv_tokens == []  # the twin stops between chunks: none was evaluated


def test_a_cancel_inside_the_new_part_of_a_prompt_keeps_the_kept_prefix_honest(
    loop: TokenLoop, tiny_llama: Llama
) -> None:
    """Cancelled while evaluating what follows a kept prefix: the C loop (inside
    llama_decode) reports the cache unknown; the twin (between chunks) reports the prefix."""
    first = tiny_llama.tokenize(b"hello world and the")
    stream(loop, tiny_llama, first, GREEDY)  # the cache holds `first` and its answer
    prompt = first + tiny_llama.tokenize(b" world and the", add_bos=False) * 10  # < n_ctx
    outcome, seen = run_paused_in_prompt(loop, tiny_llama, prompt, GREEDY, cached=len(first))
    assert (outcome.stop_code, outcome.completion_tokens, seen.text) == (StopCode.CANCELLED, 0, b"")
    assert outcome.cached_tokens == len(first)
    if loop.kind is LoopKind.C:
        assert outcome.kv_tokens is None
    else:
        assert outcome.kv_tokens == first
        # and the twin's cache really holds it: keeping it answers as a fresh evaluation
        kept = stream(loop, tiny_llama, prompt[: len(first) + 3], GREEDY, cached=len(first))
        fresh = stream(loop, tiny_llama, prompt[: len(first) + 3], GREEDY)
        assert kept.outcome is not None
        assert kept.outcome.cached_tokens == len(first)
        assert kept.text == fresh.text


# ------------------------------------------------------------------ sliding windows


@pytest.fixture(scope="module")
def window_pruning_llama(tiny_gemma3_path: Path) -> Iterator[Llama]:
    """Tiny Gemma 3 with a window cache of 256 cells (``swa_full`` off, unlike modeld's
    engine): after 300 positions the window layers no longer hold positions 0-43."""
    llama = Llama(
        model_path=str(tiny_gemma3_path),
        n_ctx=1024,
        n_batch=64,
        n_ubatch=64,
        n_threads=1,
        swa_full=False,
        verbose=False,
    )
    yield llama
    llama.close()


@pytest.mark.parametrize(
    ("cached", "kept"),
    [(50, 0), (200, 200)],
    ids=["window-cells-gone-falls-back", "window-cells-present-kept"],
)
def test_a_window_cache_is_kept_only_where_it_still_reaches_back(
    loop: TokenLoop, window_pruning_llama: Llama, cached: int, kept: int
) -> None:
    llama = window_pruning_llama
    history = [1, *((i * 7) % 260 + 3 for i in range(299))]  # 300 positions
    prompt = [*history[:cached], 5, 6, 7, 8]
    fresh = stream(loop, llama, prompt, GREEDY)  # cached=0: from an empty cache
    stream(loop, llama, history, SamplingParams(max_tokens=1, temperature=0.0))
    # the window layers now hold positions 44..299 only; the first new token at `cached`
    # looks back to cached-16: to 34 (gone) for 50, to 184 (there) for 200
    reused = stream(loop, llama, prompt, GREEDY, cached=cached)
    assert reused.outcome is not None
    assert reused.text == fresh.text
    assert reused.outcome.cached_tokens == kept


# ------------------------------------------------------------------ the real Gemma


@pytest.mark.timeout(GEMMA_TIMEOUT_S)
def test_gemma_long_prompt_then_a_follow_up_answers_as_fresh(
    gemma_path: Path, loop: TokenLoop
) -> None:
    reusing = _engine(gemma_path, loop, reuse=True, threads=2)
    fresh = _engine(gemma_path, loop, reuse=False, threads=2)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    try:
        prompt = reusing.tokenize(long_prompt())
        _, first = answer(reusing, prompt, params)
        assert first.cached_tokens == 0
        follow_up = reusing.tokenize(long_prompt() + FOLLOW_UP)
        assert follow_up[: len(prompt)] == prompt
        outcome = same_answer(reusing, fresh, follow_up, params)
        assert outcome.cached_tokens == len(prompt)
        assert outcome.kv_tokens is not None
        exchange = [*outcome.kv_tokens, *words(reusing, " Answer in one sentence.")]
        outcome = same_answer(reusing, fresh, exchange, params)
        assert outcome.cached_tokens == len(follow_up) + params.max_tokens - 1
    finally:
        reusing.close()
        fresh.close()
