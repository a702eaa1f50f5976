"""Behaviour of both token loops against real llama.cpp (tiny models and Gemma)."""

from __future__ import annotations

import os
import threading

import pytest
from llama_cpp import Llama

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.textstream import utf8_incomplete_tail
from modeld.types import LoopKind, SamplingParams
from tests.engine.conftest import TINY_N_CTX
from tests.support.engine import (
    consume,
    is_eog,
    outcome_of,
    piece,
    reference_tokens,
    run_in_worker,
    run_paused_in_prompt,
    stream,
    wait_until,
)

GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
SEEDED = SamplingParams(max_tokens=64, temperature=0.9, top_k=50, top_p=0.9, seed=1234)
# llama-cpp-python samples straight from the distribution below zero; the C chain must too
NEGATIVE_TEMPERATURE = SamplingParams(max_tokens=64, temperature=-1.0, seed=99)
SAMPLINGS = pytest.mark.parametrize(
    "params", [GREEDY, SEEDED, NEGATIVE_TEMPERATURE], ids=["greedy", "seeded", "negative-temp"]
)


def _prompt(llama: Llama, text: str = "hello world and the", special: bool = False) -> list[int]:
    return llama.tokenize(text.encode(), add_bos=True, special=special)


def _expected_text(llama: Llama, tokens: list[int]) -> bytes:
    return b"".join(piece(llama, t) for t in tokens if not is_eog(llama, t))


def _completion_count(llama: Llama, tokens: list[int]) -> int:
    return sum(1 for t in tokens if not is_eog(llama, t))


# ------------------------------------------------------------------ equivalence


@SAMPLINGS
def test_matches_llama_generate_on_tiny_model(
    loop: TokenLoop, tiny_llama: Llama, params: SamplingParams
) -> None:
    prompt = _prompt(tiny_llama)
    reference = reference_tokens(tiny_llama, prompt, params)
    seen = stream(loop, tiny_llama, prompt, params)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.LENGTH
    assert seen.text == _expected_text(tiny_llama, reference)
    assert seen.tokens == seen.outcome.completion_tokens == len(reference) == params.max_tokens
    assert seen.outcome.prompt_tokens == len(prompt)


@SAMPLINGS
def test_c_loop_token_ids_equal_llama_generate(
    c_loop: TokenLoop, tiny_llama: Llama, params: SamplingParams
) -> None:
    prompt = _prompt(tiny_llama)
    ring = c_loop.new_ring()
    outcome, token_ids = c_loop.run_traced(tiny_llama, ring, prompt, params)  # type: ignore[attr-defined]
    ring.close()
    assert token_ids == reference_tokens(tiny_llama, prompt, params)
    assert outcome.completion_tokens == params.max_tokens


def test_c_and_python_loops_agree_on_a_seeded_run(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama_b: Llama
) -> None:
    prompt = _prompt(tiny_llama_b, "the world")
    params = SamplingParams(max_tokens=200, temperature=1.2, top_k=0, top_p=1.0, seed=7)
    c_seen = stream(c_loop, tiny_llama_b, prompt, params)
    py_seen = stream(py_loop, tiny_llama_b, prompt, params)
    assert c_seen.text == py_seen.text
    assert c_seen.tokens == py_seen.tokens == 200
    assert c_seen.outcome is not None
    assert py_seen.outcome is not None
    assert c_seen.outcome.stop_code == py_seen.outcome.stop_code


@pytest.mark.slow
@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_matches_llama_generate_on_gemma(
    loop: TokenLoop, gemma_llama: Llama, params: SamplingParams
) -> None:
    prompt = _prompt(gemma_llama, "Write one sentence about the sea.")
    reference = reference_tokens(gemma_llama, prompt, params)
    seen = stream(loop, gemma_llama, prompt, params)
    assert seen.outcome is not None
    assert seen.text == _expected_text(gemma_llama, reference)
    assert seen.outcome.completion_tokens == _completion_count(gemma_llama, reference)
    if loop.kind is LoopKind.C:
        ring = loop.new_ring()
        _, token_ids = loop.run_traced(gemma_llama, ring, prompt, params)  # type: ignore[attr-defined]
        ring.close()
        assert token_ids == reference


# ------------------------------------------------------------------ stop conditions


def _boundary_stop(llama: Llama, tokens: list[int]) -> tuple[str, int]:
    """A stop string spanning a token boundary, and the index of the token completing it."""
    pieces = [piece(llama, t) for t in tokens]
    text = b"".join(pieces)
    offset = 0
    for index, current in enumerate(pieces[:-1]):
        offset += len(current)
        candidate = text[offset - 2 : offset + 2]
        if len(current) < 2 or len(pieces[index + 1]) < 2 or offset < 2:
            continue
        try:
            stop = candidate.decode("utf-8")
        except UnicodeDecodeError:
            continue
        first = text.find(candidate)
        end = first + len(candidate)
        completing = next(i for i in range(len(pieces)) if sum(map(len, pieces[: i + 1])) >= end)
        return stop, completing
    raise AssertionError("no token boundary with valid UTF-8 around it")


def test_stop_string_across_a_token_boundary(loop: TokenLoop, tiny_llama: Llama) -> None:
    prompt = _prompt(tiny_llama)
    reference = reference_tokens(tiny_llama, prompt, SamplingParams(max_tokens=200, temperature=0))
    stop, completing = _boundary_stop(tiny_llama, reference)
    full = _expected_text(tiny_llama, reference)
    params = SamplingParams(max_tokens=200, temperature=0.0, stop=("never-there", stop))
    seen = stream(loop, tiny_llama, prompt, params)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    assert seen.text == full[: full.find(stop.encode())]
    assert seen.outcome.completion_tokens == completing + 1


@pytest.mark.slow
def test_stop_string_on_gemma(loop: TokenLoop, gemma_llama: Llama) -> None:
    prompt = _prompt(gemma_llama, "List three colours, separated by commas.")
    params = SamplingParams(max_tokens=48, temperature=0.0)
    reference = reference_tokens(gemma_llama, prompt, params)
    stop, _ = _boundary_stop(gemma_llama, [t for t in reference if not is_eog(gemma_llama, t)])
    full = _expected_text(gemma_llama, reference)
    seen = stream(loop, gemma_llama, prompt, SamplingParams(48, 0.0, stop=(stop,)))
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    assert seen.text == full[: full.find(stop.encode())]


def test_max_tokens_one(loop: TokenLoop, tiny_llama: Llama) -> None:
    seen = stream(loop, tiny_llama, _prompt(tiny_llama), SamplingParams(1, 0.0))
    assert seen.outcome is not None
    assert (seen.outcome.stop_code, seen.outcome.completion_tokens, seen.tokens) == (
        StopCode.LENGTH,
        1,
        1,
    )


def test_full_context_ends_with_length(loop: TokenLoop, tiny_llama: Llama) -> None:
    prompt = (_prompt(tiny_llama) * 40)[: TINY_N_CTX - 30]
    seen = stream(loop, tiny_llama, prompt, SamplingParams(max_tokens=10_000, temperature=0))
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.LENGTH
    # the last sampled token needs no KV cell of its own
    assert seen.outcome.completion_tokens == TINY_N_CTX - len(prompt) + 1


def test_prompt_longer_than_the_context_is_an_error(loop: TokenLoop, tiny_llama: Llama) -> None:
    prompt = _prompt(tiny_llama) * 200
    assert len(prompt) > TINY_N_CTX
    seen = stream(loop, tiny_llama, prompt, GREEDY)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.ERROR
    assert seen.outcome.error is not None
    assert "llama_decode returned" in seen.outcome.error
    assert seen.text == b""
    # and the model still works afterwards
    again = stream(loop, tiny_llama, _prompt(tiny_llama), GREEDY)
    assert again.text == _expected_text(
        tiny_llama, reference_tokens(tiny_llama, _prompt(tiny_llama), GREEDY)
    )


def test_end_of_generation_token_stops(loop: TokenLoop, tiny_llama_with_eos: Llama) -> None:
    llama = tiny_llama_with_eos
    prompt = _prompt(llama)
    for seed in range(100):  # the first seed whose sampled run ends with EOG
        params = SamplingParams(max_tokens=400, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
        reference = reference_tokens(llama, prompt, params)
        if is_eog(llama, reference[-1]):
            break
    assert is_eog(llama, reference[-1])
    seen = stream(loop, llama, prompt, params)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    assert seen.outcome.completion_tokens == seen.tokens == len(reference) - 1
    assert seen.text == _expected_text(llama, reference)


# ------------------------------------------------------------------ cancellation


def _assert_model_still_greedy(loop: TokenLoop, llama: Llama) -> None:
    prompt = _prompt(llama)
    seen = stream(loop, llama, prompt, GREEDY)
    assert seen.text == _expected_text(llama, reference_tokens(llama, prompt, GREEDY))


def test_cancel_before_start(loop: TokenLoop, tiny_llama: Llama) -> None:
    ring = loop.new_ring()
    ring.cancel()
    outcome = loop.run(tiny_llama, ring, _prompt(tiny_llama), GREEDY)
    assert (outcome.stop_code, outcome.completion_tokens) == (StopCode.CANCELLED, 0)
    assert ring.drain() == (b"", 0, False)
    ring.close()
    _assert_model_still_greedy(loop, tiny_llama)


def test_cancel_during_prompt_evaluation(loop: TokenLoop, tiny_llama: Llama) -> None:
    prompt = _prompt(tiny_llama) * 40  # several graph nodes' worth; held at the first one
    outcome, seen = run_paused_in_prompt(loop, tiny_llama, prompt, GREEDY)
    assert (outcome.stop_code, outcome.completion_tokens) == (StopCode.CANCELLED, 0)
    assert (seen.text, seen.tokens) == (b"", 0)
    # the abort callback was removed: a plain Llama.generate() still works
    assert reference_tokens(tiny_llama, _prompt(tiny_llama), GREEDY)
    _assert_model_still_greedy(loop, tiny_llama)


def test_cancel_during_decode(loop: TokenLoop, tiny_llama: Llama) -> None:
    ring = loop.new_ring(16)  # the producer cannot run ahead of this consumer by much
    params = SamplingParams(max_tokens=400, temperature=0.0)
    thread, result = run_in_worker(
        lambda: loop.run(tiny_llama, ring, _prompt(tiny_llama), params), ring
    )
    batches = 0

    def cancel_after_three(_data: bytes) -> None:
        nonlocal batches
        batches += 1
        if batches == 3:
            ring.cancel()

    seen = consume(ring, cancel_after_three)
    outcome = outcome_of(thread, result)
    ring.close()
    assert outcome.stop_code is StopCode.CANCELLED
    assert 0 < outcome.completion_tokens < params.max_tokens
    assert seen.tokens <= outcome.completion_tokens
    _assert_model_still_greedy(loop, tiny_llama)


def _ring_is_full_and_producer_waits(loop: TokenLoop, ring: object) -> bool:
    if loop.kind is LoopKind.C:
        return bool(ring.producer_waiting)  # type: ignore[attr-defined]
    return len(ring._buffer) >= ring._capacity_bytes  # type: ignore[attr-defined]


def test_reader_that_stops_reading_blocks_the_producer(loop: TokenLoop, tiny_llama: Llama) -> None:
    capacity = 64
    ring = loop.new_ring(capacity)
    params = SamplingParams(max_tokens=400, temperature=0.0)
    thread, result = run_in_worker(
        lambda: loop.run(tiny_llama, ring, _prompt(tiny_llama), params), ring
    )
    wait_until(lambda: _ring_is_full_and_producer_waits(loop, ring))
    assert thread.is_alive()
    data, _, finished = ring.drain()  # memory stays bounded by the ring
    assert len(data) <= capacity
    assert not finished
    wait_until(lambda: _ring_is_full_and_producer_waits(loop, ring))
    assert thread.is_alive()
    ring.cancel()  # unblocks the producer
    outcome = outcome_of(thread, result)
    assert outcome.stop_code is StopCode.CANCELLED
    assert outcome.completion_tokens < params.max_tokens
    rest, _, finished = ring.drain()
    assert len(rest) <= capacity
    assert finished
    ring.close()


# ------------------------------------------------------------------ UTF-8


def _splits_a_character(text: bytes, offset: int) -> bool:
    """Whether ``offset`` falls inside a valid multi-byte UTF-8 character of ``text``.

    (An unfinished sequence that the next bytes do not complete is invalid, and may end a
    batch: it can never become a character.)
    """
    for start in range(max(0, offset - 3), offset):
        for length in (2, 3, 4):
            if offset < start + length <= len(text):
                try:
                    decoded = text[start : start + length].decode("utf-8")
                except UnicodeDecodeError:
                    continue
                if len(decoded) == 1:
                    return True
    return False


def test_batches_never_end_inside_a_character_on_tiny_model(
    loop: TokenLoop, tiny_llama: Llama
) -> None:
    prompt = _prompt(tiny_llama, "é 日本語")
    params = SamplingParams(max_tokens=300, temperature=1.5, top_k=0, top_p=1.0, seed=3)
    reference = reference_tokens(tiny_llama, prompt, params)
    pieces = [piece(tiny_llama, t) for t in reference]
    assert any(utf8_incomplete_tail(p) for p in pieces), "the run should split characters"
    seen = stream(loop, tiny_llama, prompt, params)
    assert seen.text == b"".join(pieces)
    assert len(seen.batches) > 1
    boundary = 0
    for batch in seen.batches[:-1]:
        boundary += len(batch)
        assert not _splits_a_character(seen.text, boundary), (boundary, seen.batches)


@pytest.mark.slow
@pytest.mark.parametrize("text", ["日本語で短い詩を書いてください。", "Repeat these emoji: 🌊🐙🚀"])
def test_gemma_multibyte_output_arrives_whole(
    loop: TokenLoop, gemma_llama: Llama, text: str
) -> None:
    prompt = _prompt(gemma_llama, text)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    reference = reference_tokens(gemma_llama, prompt, params)
    seen = stream(loop, gemma_llama, prompt, params)
    assert seen.text == _expected_text(gemma_llama, reference)
    assert any(len(ch.encode()) > 1 for ch in seen.text.decode("utf-8"))
    for batch in seen.batches:
        batch.decode("utf-8")  # strict: every batch holds whole characters


# ------------------------------------------------------------------ resources, concurrency


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_many_short_generations_leak_no_fds_or_threads(loop: TokenLoop, tiny_llama: Llama) -> None:
    prompt = _prompt(tiny_llama)
    params = SamplingParams(max_tokens=3, temperature=0.0, stop=("zz",))
    stream(loop, tiny_llama, prompt, params)  # warm-up: lazy allocations happen once
    fds, threads = _open_fds(), threading.active_count()
    texts = {stream(loop, tiny_llama, prompt, params).text for _ in range(200)}
    assert len(texts) == 1
    assert (_open_fds(), threading.active_count()) == (fds, threads)


def test_two_models_generate_at_once(
    loop: TokenLoop, tiny_llama: Llama, tiny_llama_b: Llama
) -> None:
    params = SamplingParams(max_tokens=300, temperature=0.0)
    models = [tiny_llama, tiny_llama_b]
    prompts = [_prompt(llama) for llama in models]
    expected = [
        _expected_text(llama, reference_tokens(llama, prompt, params))
        for llama, prompt in zip(models, prompts, strict=True)
    ]
    assert expected[0] != expected[1]
    start = threading.Barrier(2)
    texts: list[bytes] = [b"", b""]

    def generate(index: int) -> None:
        start.wait()
        texts[index] = stream(loop, models[index], prompts[index], params).text

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert texts == expected
