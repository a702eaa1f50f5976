"""Seed schemas for the converter's fuzzer, and the property it checks (shared with the
replay test): every keyword the converter reads, near and past each bound."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import orjson

from modeld.errors import InvalidRequest
from modeld.grammar import DEFAULT_LIMITS, SchemaGrammar

SEEDS: dict[str, object] = {
    "object": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5},
               "b": {"type": "integer", "minimum": 0}}, "required": ["a"],
               "additionalProperties": {"type": "number"}},
    "array": {"type": "array", "items": {"enum": [1, "x", None]}, "minItems": 2, "maxItems": 9},
    "tuple": {"type": "array", "prefixItems": [{"type": "boolean"}, {"const": "k"}]},
    "pattern": {"type": "string", "pattern": "^[a-z]{2,4}(-\\d+|x?)*[^\"]\\w.$"},
    "ref": {"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}}},
            "$ref": "#/$defs/n"},
    "any-of": {"anyOf": [{"type": "string", "format": "date-time"}, {"type": "null"}]},
    "types": {"type": ["string", "integer", "null"], "minLength": 1},
    "open-object": {"type": "object", "additionalProperties": True, "minProperties": 1,
                    "maxProperties": 3},
    "over-bound": {"type": "string", "maxLength": 1000000000},
    "deep": {"type": "array", "items": {"type": "array", "items": {"type": "array"}}},
}  # fmt: skip


def check_schema(data: bytes) -> None:
    """The property: a grammar within the budget, or ``InvalidRequest``; nothing else."""
    try:
        schema = orjson.loads(data)
    except orjson.JSONDecodeError:
        return
    grammar = SchemaGrammar(param="format")
    refused: InvalidRequest | None = None
    try:
        grammar.add(schema, root="root")
    except InvalidRequest as exc:
        refused = exc
    if refused is not None:
        assert refused.field == "format", refused
        return
    usage = grammar.usage()
    assert usage.grammar_bytes <= DEFAULT_LIMITS.max_grammar_bytes, usage
    assert usage.expanded_bytes <= DEFAULT_LIMITS.max_expanded_bytes, usage
    assert usage.rules <= DEFAULT_LIMITS.max_rules, usage
    assert len(grammar.text().encode()) <= usage.grammar_bytes, usage


def main(directory: str) -> None:
    Path(directory).mkdir(parents=True, exist_ok=True)
    for name, schema in SEEDS.items():
        (Path(directory) / name).write_text(json.dumps(schema))


if __name__ == "__main__":
    main(sys.argv[1])
