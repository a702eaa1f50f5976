"""Log probabilities in both token loops: the same entries token for token (within float
rounding), the values llama.cpp's own logits give, and none of the work when not asked."""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import msgspec
import numpy as np
import pytest
from llama_cpp import Llama

from modeld.engine.base import TokenLoop
from modeld.engine.grammar import grammar_for_format
from modeld.engine.logprobs import entries
from modeld.types import MAX_TOP_LOGPROBS, SamplingParams, TokenLogprob
from tests.support.engine import consume, outcome_of, run_in_worker

PROMPT_TEXT = b"The quick brown fox"


def _run(
    loop: TokenLoop, llama: Llama, params: SamplingParams, grammar: str | None = None
) -> tuple[bytes, list[TokenLogprob]]:
    prompt = llama.tokenize(PROMPT_TEXT)
    ring = loop.new_ring()
    try:
        thread, result = run_in_worker(lambda: loop.run(llama, ring, prompt, params, grammar), ring)
        seen = consume(ring)
        outcome = outcome_of(thread, result)
        assert outcome.error is None
        got = entries(ring.drain_logprobs())
        assert len(got) == outcome.completion_tokens
        return seen.text, got
    finally:
        ring.close()


def _assert_same(c: list[TokenLogprob], py: list[TokenLogprob]) -> None:
    assert [e.id for e in c] == [e.id for e in py]
    assert [e.piece for e in c] == [e.piece for e in py]
    for a, b in zip(c, py, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [(t.id, t.piece) for t in a.top] == [(t.id, t.piece) for t in b.top]
        assert [t.logprob for t in a.top] == pytest.approx([t.logprob for t in b.top], abs=1e-4)


GREEDY = SamplingParams(max_tokens=24, temperature=0.0, logprobs=5)
SAMPLED = SamplingParams(
    max_tokens=24, temperature=0.9, top_k=20, seed=7, logprobs=MAX_TOP_LOGPROBS
)


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_both_loops_report_the_same_entries_on_the_tiny_model(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama: Llama, params: SamplingParams
) -> None:
    c_text, c = _run(c_loop, tiny_llama, params)
    py_text, py = _run(py_loop, tiny_llama, params)
    assert c_text == py_text
    assert b"".join(e.piece for e in c) == c_text
    _assert_same(c, py)
    for entry in c:
        assert len(entry.top) == params.logprobs
        assert entry.logprob <= 0.0
        values = [t.logprob for t in entry.top]
        assert values == sorted(values, reverse=True)
        assert entry.logprob <= values[0] + 1e-6  # nothing beats the likeliest
        if params.temperature == 0.0:  # greedy takes the likeliest token
            assert entry.id == entry.top[0].id


def test_under_a_grammar_the_values_are_still_the_raw_distribution(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama: Llama
) -> None:
    """The grammar limits what is chosen, not what is reported: both loops agree."""
    params = msgspec.structs.replace(SAMPLED, max_tokens=16, logprobs=4)
    grammar = grammar_for_format("json")
    c_text, c = _run(c_loop, tiny_llama, params, grammar)
    py_text, py = _run(py_loop, tiny_llama, params, grammar)
    assert c_text == py_text
    assert c_text.startswith(b"{")
    _assert_same(c, py)


def test_both_loops_report_the_same_entries_on_gemma(
    c_loop: TokenLoop, py_loop: TokenLoop, gemma_llama: Llama
) -> None:
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3)
    c_text, c = _run(c_loop, gemma_llama, params)
    py_text, py = _run(py_loop, gemma_llama, params)
    assert c_text == py_text
    _assert_same(c, py)
    total = sum(math.exp(t.logprob) for t in c[0].top)
    assert 0.0 < total <= 1.0 + 1e-5


def test_nothing_is_queued_when_not_asked(loop: TokenLoop, tiny_llama: Llama) -> None:
    params = msgspec.structs.replace(GREEDY, logprobs=None)
    prompt = tiny_llama.tokenize(PROMPT_TEXT)
    ring = loop.new_ring()
    try:
        thread, result = run_in_worker(lambda: loop.run(tiny_llama, ring, prompt, params), ring)
        consume(ring)
        assert outcome_of(thread, result).completion_tokens == params.max_tokens
        assert ring.drain_logprobs() == []
    finally:
        ring.close()


def test_a_queued_record_takes_what_its_pieces_need(c_loop: TokenLoop, tiny_llama: Llama) -> None:
    """Records wait in the C loop's queue until the event loop drains them, which a
    stream's slow client delays by up to a ring's worth of tokens: each is the size of
    its pieces, not of the 256-byte bound per alternative (it was ~5.4 KB with 20)."""
    params = msgspec.structs.replace(GREEDY, max_tokens=64, logprobs=MAX_TOP_LOGPROBS)
    prompt = tiny_llama.tokenize(PROMPT_TEXT)
    ring = c_loop.new_ring()
    try:
        tracemalloc.start()  # the C loop allocates through PyMem_Raw*: traced
        before_bytes = tracemalloc.get_traced_memory()[0]
        thread, result = run_in_worker(lambda: c_loop.run(tiny_llama, ring, prompt, params), ring)
        consume(ring)
        tokens = outcome_of(thread, result).completion_tokens
        queued_bytes = tracemalloc.get_traced_memory()[0] - before_bytes
        tracemalloc.stop()
        got = entries(ring.drain_logprobs())
    finally:
        ring.close()
    assert len(got) == tokens == params.max_tokens
    assert queued_bytes / tokens < 1024, queued_bytes / tokens


def test_zero_top_logprobs_reports_the_chosen_token_only(
    loop: TokenLoop, tiny_llama: Llama
) -> None:
    _, got = _run(loop, tiny_llama, msgspec.structs.replace(GREEDY, logprobs=0))
    assert got
    assert all(entry.top == () for entry in got)


def test_the_values_are_llama_cpp_s_own_log_softmax(
    c_loop: TokenLoop, tiny_llama: Llama, tiny_model_path: Path
) -> None:
    """A reference straight from llama.cpp: every logit of prompt + answer evaluated
    with logits_all, then log-softmax in numpy."""
    _, got = _run(c_loop, tiny_llama, GREEDY)
    reference = Llama(
        model_path=str(tiny_model_path), n_ctx=512, n_batch=1, n_threads=1,
        logits_all=True, verbose=False,
    )  # fmt: skip
    try:
        prompt = reference.tokenize(PROMPT_TEXT)
        answer = [e.id for e in got]
        reference.eval(prompt + answer[:-1])
        scores = np.asarray(reference.scores[len(prompt) - 1 : len(prompt) - 1 + len(answer)])
    finally:
        reference.close()
    wide = scores.astype(np.float64)
    logsoftmax = wide - wide.max(axis=1, keepdims=True)
    logsoftmax -= np.log(np.exp(logsoftmax).sum(axis=1, keepdims=True))
    for row, entry in zip(logsoftmax, got, strict=True):
        assert entry.logprob == pytest.approx(row[entry.id], abs=1e-3)
        best = np.argsort(-row, kind="stable")[: len(entry.top)]
        assert [t.id for t in entry.top] == [int(i) for i in best]
        assert [t.logprob for t in entry.top] == pytest.approx(list(row[best]), abs=1e-3)


def test_more_than_the_bound_is_refused_before_the_loop_runs(
    c_loop: TokenLoop, tiny_llama: Llama
) -> None:
    too_many = msgspec.structs.replace(GREEDY, logprobs=MAX_TOP_LOGPROBS + 1)
    ring = c_loop.new_ring()
    try:
        with pytest.raises(ValueError, match="logprobs"):
            c_loop.run(tiny_llama, ring, tiny_llama.tokenize(PROMPT_TEXT), too_many)
    finally:
        ring.close()
    with pytest.raises(msgspec.ValidationError, match="logprobs"):
        msgspec.convert({"logprobs": MAX_TOP_LOGPROBS + 1}, SamplingParams)
