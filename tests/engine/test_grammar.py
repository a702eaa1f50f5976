"""Structured output in both token loops: a grammar in the sampler chain, token for token
the chain ``Llama.generate(grammar=...)`` builds; schemas llama-cpp-python's converter
cannot express, and grammars llama.cpp refuses, are refused before anything runs."""

from __future__ import annotations

import json

import pytest
from llama_cpp import Llama

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.grammar import (
    GRAMMAR_REFUSED,
    MAX_GRAMMAR_BYTES,
    check_grammar,
    grammar_for_format,
)
from modeld.errors import InvalidRequest
from modeld.types import LoopKind, SamplingParams
from tests.support.engine import reference_tokens, stream

SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["ok", "n"],
}
GREEDY = SamplingParams(max_tokens=64, temperature=0.0)
SEEDED = SamplingParams(max_tokens=64, temperature=0.9, top_k=0, top_p=1.0, seed=3)
SAMPLINGS = pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])


def _prompt(llama: Llama, text: bytes = b"hello world") -> list[int]:
    return llama.tokenize(text, add_bos=True)


@SAMPLINGS
def test_a_schema_grammar_gives_matching_json_in_both_loops(
    loop: TokenLoop, tiny_llama: Llama, params: SamplingParams
) -> None:
    """The random tiny model writes only what the schema allows, then stops: once the
    grammar is complete, end-of-generation is the one token it still accepts."""
    seen = stream(loop, tiny_llama, _prompt(tiny_llama), params, grammar=grammar_for_format(SCHEMA))
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    value = json.loads(seen.text)
    assert set(value) == {"ok", "n"}
    assert isinstance(value["ok"], bool)
    assert isinstance(value["n"], int)


@SAMPLINGS
def test_c_loop_token_ids_equal_llama_generate_with_a_grammar(
    c_loop: TokenLoop, py_loop: TokenLoop, tiny_llama: Llama, params: SamplingParams
) -> None:
    grammar = grammar_for_format(SCHEMA)
    prompt = _prompt(tiny_llama)
    ring = c_loop.new_ring()
    outcome, token_ids = c_loop.run_traced(  # type: ignore[attr-defined]
        tiny_llama, ring, prompt, params, grammar=grammar
    )
    ring.close()
    assert token_ids == reference_tokens(tiny_llama, prompt, params, grammar)
    assert outcome.completion_tokens == len(token_ids) - 1  # the last one is the EOG
    c_text = stream(c_loop, tiny_llama, prompt, params, grammar=grammar).text
    assert c_text == stream(py_loop, tiny_llama, prompt, params, grammar=grammar).text


def test_the_generic_json_grammar_constrains_the_first_byte(
    loop: TokenLoop, tiny_llama: Llama
) -> None:
    """``"json"``: an object, whatever the (random) model would have said otherwise."""
    free = stream(loop, tiny_llama, _prompt(tiny_llama), GREEDY)
    constrained = stream(
        loop, tiny_llama, _prompt(tiny_llama), GREEDY, grammar=grammar_for_format("json")
    )
    assert not free.text.startswith(b"{")
    assert constrained.text.startswith(b"{")


@pytest.mark.parametrize(
    "grammar", ["root ::= [unclosed", 'root ::= "a" missing', 'start ::= "a"'],
    ids=["unclosed", "undefined-rule", "no-root"],
)  # fmt: skip
def test_a_grammar_llama_cpp_refuses_ends_the_run_before_any_token(
    loop: TokenLoop, tiny_llama: Llama, grammar: str
) -> None:
    seen = stream(loop, tiny_llama, _prompt(tiny_llama), GREEDY, grammar=grammar)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.ERROR
    assert seen.outcome.error == GRAMMAR_REFUSED
    assert seen.text == b""
    assert seen.outcome.completion_tokens == 0
    after = stream(loop, tiny_llama, _prompt(tiny_llama), GREEDY)  # the model is fine
    assert after.outcome is not None
    assert after.outcome.stop_code is StopCode.LENGTH


def test_check_grammar_refuses_what_llama_cpp_refuses(tiny_llama: Llama) -> None:
    vocab = tiny_llama._model.vocab
    check_grammar(vocab, grammar_for_format(SCHEMA))
    for grammar in ["root ::= [unclosed", 'root ::= "a"\x00', ""]:
        if grammar == "":
            check_grammar(vocab, grammar)  # llama.cpp: an empty grammar constrains nothing
            continue
        with pytest.raises(InvalidRequest) as caught:
            check_grammar(vocab, grammar)
        assert caught.value.field == "format"


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"$ref": "https://example.com/schema.json"}, "cannot be enforced"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "cannot be enforced"),
        ({"type": "no-such-type"}, "cannot be enforced"),
        ({"type": "string", "pattern": "(unclosed"}, "cannot be enforced"),
        ({"type": "array", "items": {"enum": [f"value-{i}" * 40 for i in range(2000)]}}, "over"),
    ],
    ids=["remote-ref", "missing-ref", "unknown-type", "bad-pattern", "too-large"],
)  # fmt: skip
def test_a_schema_the_converter_cannot_express_is_refused_naming_format(
    schema: dict[str, object], reason: str
) -> None:
    with pytest.raises(InvalidRequest, match=reason) as caught:
        grammar_for_format(schema)
    assert caught.value.field == "format"
    assert len(json.dumps(schema)) < 1024 * 1024  # under the default body limit


def test_the_grammar_bound_is_the_documented_one() -> None:
    assert MAX_GRAMMAR_BYTES == 256 * 1024


@pytest.mark.slow
@pytest.mark.parametrize("kind", [LoopKind.C, LoopKind.PYTHON], ids=str)
def test_gemma_writes_schema_json_token_for_token_with_llama_generate(
    kind: LoopKind, gemma_llama: Llama
) -> None:
    from modeld.engine.select import token_loop

    loop = token_loop(kind)
    grammar = grammar_for_format(SCHEMA)
    prompt = _prompt(gemma_llama, b"Reply in JSON with ok and n:")
    params = SamplingParams(max_tokens=48, temperature=0.0)
    reference = reference_tokens(gemma_llama, prompt, params, grammar)
    seen = stream(loop, gemma_llama, prompt, params, grammar=grammar)
    assert seen.outcome is not None
    assert seen.outcome.stop_code is StopCode.STOP
    assert set(json.loads(seen.text)) == {"ok", "n"}
    if kind is LoopKind.C:
        ring = loop.new_ring()
        _, token_ids = loop.run_traced(  # type: ignore[attr-defined]
            gemma_llama, ring, prompt, params, grammar=grammar
        )
        ring.close()
        assert token_ids == reference
