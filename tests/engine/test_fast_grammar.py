"""The grammar checked against the chosen token first (csrc/sampling.h, fastgrammar.py):
token for token the full constrained pass, in both loops; and lazy grammars, free until a
trigger, the same in both loops."""

from __future__ import annotations

import json
import re

import pytest
from llama_cpp import Llama

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.grammar import grammar_for_format
from modeld.types import GrammarConstraint, SamplingParams
from tests.support.engine import reference_tokens, stream

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "n": {"type": "integer"}},
    "required": ["name", "n"],
}
GREEDY = SamplingParams(max_tokens=48, temperature=0.0)
SAMPLINGS = {
    "greedy": GREEDY,
    "top-k-40": SamplingParams(max_tokens=48, temperature=0.9, seed=7),
    "top-k-5": SamplingParams(max_tokens=48, temperature=1.3, top_k=5, seed=11),
    "top-k-0": SamplingParams(max_tokens=48, temperature=0.9, top_k=0, top_p=1.0, seed=3),
    "repeat-penalty": SamplingParams(max_tokens=48, temperature=0.7, repeat_penalty=1.3, seed=5),
}
GRAMMARS = {"schema": grammar_for_format(SCHEMA), "json": grammar_for_format("json")}


def _prompt(llama: Llama) -> list[int]:
    return llama.tokenize(b"hello world", add_bos=True)


def _c_tokens(
    loop: TokenLoop, llama: Llama, params: SamplingParams, grammar: GrammarConstraint
) -> tuple[list[int], list[int]]:
    ring = loop.new_ring()
    paths: list[int] = []
    _, token_ids = loop.run_traced(  # type: ignore[attr-defined]
        llama, ring, _prompt(llama), params, grammar=grammar, grammar_paths=paths
    )
    ring.close()
    return token_ids, paths


@pytest.mark.parametrize("grammar_name", list(GRAMMARS))
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_the_c_fast_path_is_the_full_pass_token_for_token(
    c_loop: TokenLoop, tiny_llama: Llama, sampling: str, grammar_name: str
) -> None:
    params, gbnf = SAMPLINGS[sampling], GRAMMARS[grammar_name]
    fast, paths = _c_tokens(c_loop, tiny_llama, params, GrammarConstraint(gbnf=gbnf))
    full, full_paths = _c_tokens(
        c_loop, tiny_llama, params, GrammarConstraint(gbnf=gbnf, full_pass=True)
    )
    assert fast == full
    assert fast == reference_tokens(tiny_llama, _prompt(tiny_llama), params, gbnf)
    assert full_paths == [0, 0]  # the reference never touched the fast sampler
    assert sum(paths) == len(fast)
    if sampling in ("greedy", "top-k-40"):
        assert paths[0] > 0, f"the fast path never decided: {paths}"
    if sampling == "top-k-0":
        assert paths[0] == 0  # every allowed token matters: always the full pass


@pytest.mark.parametrize("grammar_name", list(GRAMMARS))
@pytest.mark.parametrize("sampling", list(SAMPLINGS))
def test_both_loops_write_what_the_full_pass_writes(
    loop: TokenLoop, tiny_llama: Llama, sampling: str, grammar_name: str
) -> None:
    params, gbnf = SAMPLINGS[sampling], GRAMMARS[grammar_name]
    prompt = _prompt(tiny_llama)
    fast = stream(loop, tiny_llama, prompt, params, grammar=GrammarConstraint(gbnf=gbnf))
    full = stream(
        loop, tiny_llama, prompt, params, grammar=GrammarConstraint(gbnf=gbnf, full_pass=True)
    )
    assert fast.outcome is not None
    assert full.outcome is not None
    assert fast.text == full.text
    assert fast.outcome.completion_tokens == full.outcome.completion_tokens
    if fast.outcome.stop_code is StopCode.STOP:
        json.loads(
            fast.text, strict=False
        )  # a complete answer parses (strings may hold raw bytes the converter allows)


def test_a_schema_grammar_still_holds_on_the_fast_path(loop: TokenLoop, tiny_llama: Llama) -> None:
    # The schema's grammar is bounded (about 200 bytes at most: whitespace and digits
    # have caps), so a byte-token model ends it within 256 tokens whatever it picks.
    seen = stream(
        loop, tiny_llama, _prompt(tiny_llama), SamplingParams(max_tokens=256, temperature=0.0),
        grammar=GrammarConstraint(gbnf=GRAMMARS["schema"]),
    )  # fmt: skip
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    # a random byte-token model may put broken UTF-8 in a string: the shape is what counts
    value = json.loads(seen.text.decode("utf-8", "replace"), strict=False)
    assert set(value) == {"name", "n"}
    assert isinstance(value["n"], int)


# ------------------------------------------------------------------------------ lazy


def _free_text(loop: TokenLoop, llama: Llama, params: SamplingParams) -> bytes:
    return stream(loop, llama, _prompt(llama), params).text


def _lazy_after(trigger: str) -> GrammarConstraint:
    """A call-like grammar that starts with ``trigger`` and holds the rest to a JSON
    object with an integer, free until the output contains ``trigger``."""
    literal = json.dumps(trigger)
    return GrammarConstraint(
        gbnf=f'root ::= {literal} "{{\\"n\\": " [1-9] [0-9]{{0,3}} "}}"',
        trigger_patterns=(f"^[\\s\\S]*?({re.escape(trigger)})[\\s\\S]*$",),
    )


@pytest.mark.parametrize("sampling", ["greedy", "top-k-40"])
def test_a_lazy_grammar_leaves_free_text_free_then_holds_the_call(
    loop: TokenLoop, tiny_llama: Llama, sampling: str
) -> None:
    """The random model's own text up to an ASCII letter it writes anyway (the trigger),
    then exactly the grammar's continuation, which parses."""
    params = SAMPLINGS[sampling]
    free = _free_text(loop, tiny_llama, params)
    at = next(i for i, byte in enumerate(free) if chr(byte).isalpha() and byte < 128)
    trigger = chr(free[at])
    seen = stream(loop, tiny_llama, _prompt(tiny_llama), params, grammar=_lazy_after(trigger))
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    assert seen.text[: at + 1] == free[: at + 1]  # free until the trigger
    call = seen.text[at + 1 :]
    assert re.fullmatch(rb'\{"n": [1-9][0-9]{0,3}\}', call), seen.text
    assert json.loads(call)["n"] >= 1


@pytest.mark.parametrize("sampling", ["greedy", "top-k-40", "top-k-0"])
def test_both_loops_write_the_same_under_a_lazy_grammar(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama: Llama, sampling: str
) -> None:
    params = SAMPLINGS[sampling]
    free = _free_text(c_loop, tiny_llama, params)
    trigger = chr(next(b for b in free if chr(b).isalpha() and b < 128))
    for full_pass in (False, True):
        constraint = GrammarConstraint(
            gbnf=_lazy_after(trigger).gbnf,
            trigger_patterns=_lazy_after(trigger).trigger_patterns,
            full_pass=full_pass,
        )
        c_seen = stream(c_loop, tiny_llama, _prompt(tiny_llama), params, grammar=constraint)
        py_seen = stream(py_loop, tiny_llama, _prompt(tiny_llama), params, grammar=constraint)
        assert c_seen.text == py_seen.text
        assert c_seen.outcome is not None
        assert py_seen.outcome is not None
        assert c_seen.outcome.completion_tokens == py_seen.outcome.completion_tokens


def test_a_trigger_token_starts_the_grammar_at_that_token(
    loop: TokenLoop, c_loop: TokenLoop, tiny_llama: Llama
) -> None:
    """With a trigger token the grammar is fed from that token on, itself included."""
    prompt = _prompt(tiny_llama)
    ring = c_loop.new_ring()
    _, free_ids = c_loop.run_traced(tiny_llama, ring, prompt, GREEDY)  # type: ignore[attr-defined]
    ring.close()
    pieces = [tiny_llama.detokenize([t]) for t in free_ids]
    at = next(i for i, p in enumerate(pieces) if len(p) == 1 and chr(p[0]).isalpha() and p[0] < 128)
    letter = pieces[at].decode()
    grammar = GrammarConstraint(
        gbnf=f'root ::= "{letter}" [0-9] [0-9] [0-9]', trigger_tokens=(free_ids[at],)
    )
    seen = stream(loop, tiny_llama, prompt, GREEDY, grammar=grammar)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    before = b"".join(pieces[:at])
    assert seen.text.startswith(before)
    assert re.fullmatch(rb"[a-zA-Z][0-9]{3}", seen.text[len(before) :]), seen.text
