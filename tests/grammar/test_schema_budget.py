"""Random schemas either convert within the budget, into a grammar llama.cpp parses,
or are refused naming the caller's field: never anything else, never past the bounds.
Asserted on the budget's own counters and the output's size, not on time."""

from __future__ import annotations

from hypothesis import HealthCheck, example, given, settings
from llama_cpp import Llama

from modeld.engine.grammar import grammar_is_accepted
from modeld.errors import InvalidRequest
from modeld.grammar import DEFAULT_LIMITS, SchemaGrammar, schema_grammar
from tests.grammar.strategies import SCHEMAS


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS)
def test_a_random_schema_converts_within_the_budget_or_is_refused(schema: object) -> None:
    grammar = SchemaGrammar(param="tools[0].parameters")
    refused: InvalidRequest | None = None
    try:
        root = grammar.add(schema, root="args")
    except InvalidRequest as exc:
        refused = exc
    if refused is not None:
        assert refused.field == "tools[0].parameters"
        assert refused.message
        return
    usage = grammar.usage()
    text = grammar.text()
    assert root == "args"
    assert usage.grammar_bytes <= DEFAULT_LIMITS.max_grammar_bytes
    assert usage.expanded_bytes <= DEFAULT_LIMITS.max_expanded_bytes
    assert usage.rules <= DEFAULT_LIMITS.max_rules
    assert len(text.encode()) <= usage.grammar_bytes  # counted while it was made


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=SCHEMAS)
@example(schema={"properties": {"日本": {"maxLength": 3}, "ñ²": {"enum": ["é"]}}})  # rule names
def test_every_grammar_made_is_one_llama_cpp_parses(schema: object, vocab_llama: Llama) -> None:
    try:
        text = schema_grammar(schema)
    except InvalidRequest:
        return
    assert grammar_is_accepted(vocab_llama._model.vocab, text), text
