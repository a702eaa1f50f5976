"""Restores from the prompt cache answer exactly as fresh evaluations do (greedy), on
both token loops, on the tiny llama, the tiny Gemma 3 and the real Gemma 3 270M.

The pattern is a conversation displaced from the context by another one, then resumed:
the resumed turn must restore its history from the cache, not evaluate it again.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.gguf import FileIdentity
from modeld.prompt_cache.cache import MIN_ENTRY_TOKENS, PromptCache
from modeld.prompt_cache.disk_tier import DiskTier
from modeld.prompt_cache.namespace import Namespace
from modeld.sizes import MIB
from modeld.types import SamplingParams
from tests.engine.test_prompt_reuse import answer, words
from tests.support.prompts import FOLLOW_UP, long_prompt
from tests.support.tiny_gemma3 import write_tiny_gemma3_gguf

GREEDY = SamplingParams(max_tokens=16, temperature=0.0)


def make_engine(
    path: Path, loop: TokenLoop, *, reuse: bool = True, threads: int = 1
) -> LlamaEngine:
    settings = EngineSettings(
        n_ctx=1024, n_batch=64, n_threads=threads, n_gpu_layers=0, prompt_reuse=reuse
    )
    return LlamaEngine(path, settings, loop, 2048)


def namespace_of(engine: LlamaEngine, path: Path) -> Namespace:
    sizes = engine.sizes
    return Namespace.of(
        path.name, FileIdentity.of(path.stat()), sizes.n_ctx, sizes.n_batch, sizes.n_ubatch
    )


def attach(engine: LlamaEngine, path: Path, cache: PromptCache) -> None:
    engine.attach_prompt_cache(cache.for_model(namespace_of(engine, path)))


@pytest.fixture(scope="module")
def tiny_gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gemma3_gguf(tmp_path_factory.mktemp("tiny-gemma3") / "tiny-g3.gguf")


@pytest.fixture(params=["tiny-llama", "tiny-gemma3"])
def model_path(
    request: pytest.FixtureRequest, tiny_model_path: Path, tiny_gemma3_path: Path
) -> Path:
    return tiny_model_path if request.param == "tiny-llama" else tiny_gemma3_path


def resume_after_displacement(
    cached_engine: LlamaEngine, fresh: LlamaEngine, first_text: str, other_text: str, more: str
) -> tuple[int, int]:
    """Ask ``first_text``, then ``other_text`` (displacing it), then the first exchange
    plus ``more``; asserts the last answer equals ``fresh``'s and returns
    (its cached tokens, the first exchange's length)."""
    first = cached_engine.tokenize(first_text)
    _, outcome = answer(cached_engine, first, GREEDY)
    assert outcome.kv_tokens is not None
    exchange = list(outcome.kv_tokens)
    answer(cached_engine, cached_engine.tokenize(other_text), GREEDY)  # displaces it
    resumed = [*exchange, *words(cached_engine, more)]
    text, outcome = answer(cached_engine, resumed, GREEDY)
    fresh_text, fresh_outcome = answer(fresh, resumed, GREEDY)
    assert fresh_outcome.cached_tokens == 0
    assert outcome.stop_code is fresh_outcome.stop_code
    assert text == fresh_text
    return outcome.cached_tokens, len(exchange)


def test_a_displaced_conversation_is_restored_and_answers_as_fresh(
    model_path: Path, token_loop: TokenLoop
) -> None:
    cache = PromptCache(64 * MIB)
    engine, fresh = (
        make_engine(model_path, token_loop),
        make_engine(model_path, token_loop, reuse=False),
    )
    attach(engine, model_path, cache)
    try:
        cached, history = resume_after_displacement(
            engine, fresh, long_prompt(6), "the world " * 20, " and the world"
        )
        assert history >= MIN_ENTRY_TOKENS
        assert cached == history  # all of it restored, not only the shared BOS
        stats = cache.statistics()
        assert (stats.hits_memory, stats.saves) == (1, 2)
        assert stats.restored_tokens == history
    finally:
        engine.close()
        fresh.close()


def test_an_unloaded_instance_is_restored_by_the_next_one(
    model_path: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    """close() saves; a new engine on the same file restores, from memory and (a new
    cache on the same directory: a restart) from disk."""
    prompt_text = long_prompt(6)
    cache = PromptCache(64 * MIB, disk=DiskTier(tmp_path, 64 * MIB))
    first = make_engine(model_path, token_loop)
    attach(first, model_path, cache)
    _, outcome = answer(first, first.tokenize(prompt_text), GREEDY)
    assert outcome.kv_tokens is not None
    exchange = list(outcome.kv_tokens)
    first.close()
    assert cache.flush(60.0)  # the file is written off the worker thread
    assert cache.statistics().memory_entries == cache.statistics().disk_entries == 1
    fresh = make_engine(model_path, token_loop, reuse=False)
    try:
        resumed = [*exchange, *words(fresh, FOLLOW_UP)]
        fresh_text, _ = answer(fresh, resumed, GREEDY)
        for restarted in (False, True):
            if restarted:
                cache = PromptCache(64 * MIB, disk=DiskTier(tmp_path, 64 * MIB))
            second = make_engine(model_path, token_loop)
            attach(second, model_path, cache)
            try:
                text, outcome = answer(second, resumed, GREEDY)
            finally:
                second.attach_prompt_cache(None)  # keep the entry as it is
                second.close()
            assert outcome.cached_tokens == len(exchange)
            assert text == fresh_text
            stats = cache.statistics()
            assert (stats.hits_memory, stats.hits_disk) == ((0, 1) if restarted else (1, 0))
    finally:
        fresh.close()


def test_a_cancel_before_the_restore_restores_nothing(
    tiny_model_path: Path, token_loop: TokenLoop
) -> None:
    cache = PromptCache(64 * MIB)
    engine = make_engine(tiny_model_path, token_loop)
    attach(engine, tiny_model_path, cache)
    try:
        _, outcome = answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
        assert outcome.kv_tokens is not None
        exchange = list(outcome.kv_tokens)
        answer(engine, engine.tokenize("the world " * 20), GREEDY)
        ring = engine.new_ring()
        ring.cancel()
        cancelled = engine.generate(ring, [*exchange, *words(engine, " and")], GREEDY)
        ring.close()
        assert cancelled.stop_code is StopCode.CANCELLED
        assert cache.statistics().hits_memory == 0
        _, outcome = answer(engine, [*exchange, *words(engine, " and")], GREEDY)
        assert outcome.cached_tokens == len(exchange)  # still there for the next request
    finally:
        engine.close()


def test_the_real_gemma_answers_as_fresh_after_a_restore(
    gemma_path: Path, token_loop: TokenLoop
) -> None:
    """Sliding-window layers (swa_full): the saved state holds both caches; a restore
    answers as the live context's own reuse and as a fresh evaluation do."""
    cache = PromptCache(256 * MIB)
    engine = make_engine(gemma_path, token_loop, threads=2)
    fresh = make_engine(gemma_path, token_loop, reuse=False, threads=2)
    attach(engine, gemma_path, cache)
    try:
        cached, history = resume_after_displacement(
            engine, fresh, long_prompt(), "Tell me about the sea. " * 10, " Answer in one sentence."
        )
        assert cached == history
        assert cache.statistics().hits_memory == 1
    finally:
        engine.close()
        fresh.close()


def test_a_branch_inside_a_longer_entry_is_saved_on_a_sliding_window_model(
    tiny_gemma3_path: Path, token_loop: TokenLoop
) -> None:
    """A conversation taken back to an earlier turn (a regenerated or edited message)
    holds a prefix of a longer cached entry. With a sliding window only whole entries
    restore, so the longer entry cannot serve the branch: the prefix must be saved in its
    own right, and the branch's next turn restores it."""
    path = tiny_gemma3_path
    cache = PromptCache(64 * MIB)
    engine = make_engine(path, token_loop)
    fresh = make_engine(path, token_loop, reuse=False)
    attach(engine, path, cache)
    try:
        _, first = answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
        assert first.kv_tokens is not None
        early = list(first.kv_tokens)
        _, later = answer(engine, [*early, *words(engine, " and then")], GREEDY)
        assert later.kv_tokens is not None
        assert len(later.kv_tokens) > len(early)
        answer(engine, engine.tokenize("the world " * 20), GREEDY)  # saves the longer one
        _, again = answer(engine, engine.tokenize(long_prompt(6)), GREEDY)  # back to turn 1
        assert again.kv_tokens is not None
        assert list(again.kv_tokens) == early
        answer(engine, engine.tokenize("another world " * 20), GREEDY)  # saves the branch
        branch = [*early, *words(engine, " but instead")]
        text, outcome = answer(engine, branch, GREEDY)
        fresh_text, _ = answer(fresh, branch, GREEDY)
        assert outcome.cached_tokens == len(early)
        assert text == fresh_text
    finally:
        engine.close()
        fresh.close()
