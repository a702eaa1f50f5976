"""The C loop reads each sampling parameter by name: a test hook echoes what it read,
and a run whose top_p/min_p pair would change the text if swapped matches the Python
twin token for token."""

from __future__ import annotations

import msgspec
import pytest
from llama_cpp import Llama

from modeld.engine.base import TokenLoop
from modeld.types import SamplingParams
from tests.support.engine import stream

# Every field distinct, and exact in binary floating point.
DISTINCT = SamplingParams(
    max_tokens=7, temperature=0.25, top_p=0.5, top_k=3, min_p=0.125, repeat_penalty=1.5,
    stop=("a", "bc"), seed=11, presence_penalty=0.75, frequency_penalty=-0.375, logprobs=13,
)  # fmt: skip


def test_every_sampling_field_reaches_the_member_of_its_name(c_loop: TokenLoop) -> None:
    """Fails on a swapped pair, and on a field of SamplingParams the C reader lacks."""
    expected = msgspec.structs.asdict(DISTINCT)
    scalars = [value for name, value in expected.items() if name != "stop"]
    assert len(set(scalars)) == len(scalars)
    expected["stop"] = tuple(stop.encode() for stop in DISTINCT.stop)
    assert c_loop._ext.sampling_as_read(DISTINCT) == expected  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("params", "error", "field"),
    [
        (msgspec.structs.replace(DISTINCT, top_k=2**40), OverflowError, "top_k"),
        (msgspec.structs.replace(DISTINCT, seed=2**32), OverflowError, "seed"),
        (msgspec.structs.replace(DISTINCT, seed=-1), OverflowError, "seed"),
    ],
    ids=["top_k", "seed-too-big", "seed-negative"],
)
def test_an_out_of_range_field_is_named(
    c_loop: TokenLoop, params: SamplingParams, error: type[Exception], field: str
) -> None:
    with pytest.raises(error, match=field):
        c_loop._ext.sampling_as_read(params)  # type: ignore[attr-defined]


def test_run_takes_its_arguments_by_name_only(c_loop: TokenLoop) -> None:
    ring = c_loop.new_ring()
    with pytest.raises(TypeError, match="positional"):
        c_loop._ext.run(ring)  # type: ignore[attr-defined]
    with pytest.raises(TypeError, match="by name"):
        c_loop._ext.run(ring=ring)  # type: ignore[attr-defined]
    ring.close()


def test_top_p_and_min_p_reach_their_own_samplers(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama: Llama
) -> None:
    """top_p=1 and min_p=0 keep the whole distribution; swapped, each keeps only the top
    token (greedy). The twin passes both to llama.cpp by keyword."""
    prompt = tiny_llama.tokenize(b"hello world and the", add_bos=True)
    params = SamplingParams(max_tokens=48, temperature=1.5, top_k=0, top_p=1.0, min_p=0.0, seed=3)
    swapped = msgspec.structs.replace(params, top_p=params.min_p, min_p=params.top_p)
    c_seen = stream(c_loop, tiny_llama, prompt, params)
    py_seen = stream(py_loop, tiny_llama, prompt, params)
    assert c_seen.text == py_seen.text
    assert c_seen.tokens == py_seen.tokens == 48
    assert stream(py_loop, tiny_llama, prompt, swapped).text != py_seen.text  # it matters


def test_presence_and_frequency_penalties_reach_their_own_samplers(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama: Llama
) -> None:
    """Greedy, so only the penalties move the text: the loops agree token for token, the
    penalties change the text, and swapping the two changes it again (each reaches its own
    argument of llama_sampler_init_penalties: a token seen once loses presence + frequency
    either way, one seen twice tells them apart)."""
    prompt = tiny_llama.tokenize(b"hello world and the", add_bos=True)
    plain = SamplingParams(max_tokens=200, temperature=0.0)
    penalised = msgspec.structs.replace(plain, presence_penalty=1.5, frequency_penalty=0.25)
    swapped = msgspec.structs.replace(plain, presence_penalty=0.25, frequency_penalty=1.5)
    texts = {}
    for name, params in {"plain": plain, "penalised": penalised, "swapped": swapped}.items():
        c_seen = stream(c_loop, tiny_llama, prompt, params)
        py_seen = stream(py_loop, tiny_llama, prompt, params)
        assert c_seen.text == py_seen.text, name
        texts[name] = c_seen.text
    assert len(set(texts.values())) == 3, texts
