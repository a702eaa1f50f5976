"""An idle model keeps its context's prefix in the memory tier (``CacheTier.keep_idle``),
so the turn that displaces it later pays no save: the state is copied once, in idle time;
its file is written only when it is displaced or the engine closes."""

from __future__ import annotations

from pathlib import Path

from modeld.engine.base import TokenLoop
from modeld.prompt_cache.cache import MIN_ENTRY_TOKENS, PromptCache
from modeld.prompt_cache.disk_tier import DiskTier
from modeld.sizes import MIB
from tests.engine.test_prompt_reuse import answer, words
from tests.prompt_cache.test_restore import GREEDY, attach, make_engine
from tests.support.prompts import long_prompt


def test_an_idle_prefix_is_kept_in_memory_only_then_written_when_displaced(
    tiny_model_path: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    cache = PromptCache(64 * MIB, disk=DiskTier(tmp_path, 64 * MIB))
    engine = make_engine(tiny_model_path, token_loop)
    fresh = make_engine(tiny_model_path, token_loop, reuse=False)
    attach(engine, tiny_model_path, cache)
    try:
        _, outcome = answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
        assert outcome.kv_tokens is not None
        exchange = list(outcome.kv_tokens)
        assert engine.cache_tier.worth_keeping()
        engine.cache_tier.keep_idle(lambda: True)
        assert cache.flush(60.0)
        stats = cache.statistics()
        assert (stats.saves, stats.memory_entries) == (1, 1)
        assert (stats.disk_entries, stats.disk_writes) == (0, 0)  # memory only
        engine.cache_tier.keep_idle(lambda: True)  # the same prefix: nothing new
        assert cache.statistics().saves == 1

        answer(engine, engine.tokenize("the world " * 20), GREEDY)  # displaces it
        assert cache.flush(60.0)
        stats = cache.statistics()
        assert stats.saves == 1  # no second copy of the state: the kept one was written
        assert (stats.disk_entries, stats.disk_writes) == (1, 1)

        resumed = [*exchange, *words(engine, " and the world")]
        text, outcome = answer(engine, resumed, GREEDY)
        fresh_text, _ = answer(fresh, resumed, GREEDY)
        assert outcome.cached_tokens == len(exchange)  # restored from the kept entry
        assert text == fresh_text
        assert cache.statistics().hits_memory == 1
    finally:
        engine.close()
        fresh.close()


def test_a_conversation_that_goes_on_writes_only_at_close(
    tiny_model_path: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    """Each idle turn supersedes the last in memory; the disk sees the last one, once."""
    cache = PromptCache(64 * MIB, disk=DiskTier(tmp_path, 64 * MIB))
    engine = make_engine(tiny_model_path, token_loop)
    attach(engine, tiny_model_path, cache)
    tokens = engine.tokenize(long_prompt(6))
    for turn in range(3):
        _, outcome = answer(engine, tokens, GREEDY)
        assert outcome.kv_tokens is not None
        assert outcome.cached_tokens > (MIN_ENTRY_TOKENS if turn else -1)
        engine.cache_tier.keep_idle(lambda: True)
        tokens = [*outcome.kv_tokens, *words(engine, " and then")]
    assert cache.flush(60.0)
    stats = cache.statistics()
    assert (stats.saves, stats.memory_entries, stats.disk_writes) == (3, 1, 0)
    engine.close()
    assert cache.flush(60.0)
    stats = cache.statistics()
    assert (stats.saves, stats.disk_entries, stats.disk_writes) == (3, 1, 1)


def test_nothing_is_kept_once_a_request_waits_or_the_engine_closed(
    tiny_model_path: Path, token_loop: TokenLoop
) -> None:
    cache = PromptCache(64 * MIB)
    engine = make_engine(tiny_model_path, token_loop)
    attach(engine, tiny_model_path, cache)
    answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
    engine.cache_tier.keep_idle(lambda: False)  # a request took the slot meanwhile
    assert cache.statistics().saves == 0
    engine.close()  # saves at close, as before
    saves = cache.statistics().saves
    engine.cache_tier.keep_idle(lambda: True)
    assert cache.statistics().saves == saves


def test_a_short_prefix_or_no_memory_tier_is_not_worth_a_call(
    tiny_model_path: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    engine = make_engine(tiny_model_path, token_loop)
    try:
        assert not engine.cache_tier.worth_keeping()  # no cache attached
        attach(engine, tiny_model_path, PromptCache(64 * MIB))
        answer(engine, engine.tokenize("the world"), GREEDY)
        assert not engine.cache_tier.worth_keeping()  # shorter than an entry may be
        attach(engine, tiny_model_path, PromptCache(0, disk=DiskTier(tmp_path, 64 * MIB)))
        answer(engine, engine.tokenize(long_prompt(6)), GREEDY)
        assert not engine.cache_tier.worth_keeping()  # disk only: saved when displaced
    finally:
        engine.close()
