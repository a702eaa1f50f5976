"""JSON schemas of tool arguments as GBNF rules, behind ONE function.

:func:`arguments_grammar` is the single seam to the schema converter (today
llama-cpp-python's ``SchemaConverter``, the one ``engine.grammar.grammar_for_format``
uses): a bounded converter replaces its body and nothing else changes.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llama_cpp.llama_grammar import SchemaConverter

from modeld.engine.grammar import MAX_GRAMMAR_BYTES
from modeld.errors import InvalidRequest

__all__ = ["ArgumentRules", "arguments_grammar"]


class ArgumentRules:
    """GBNF rules (no ``root``) with one rule per tool for its arguments, plus ``space``
    and ``string`` rules the call grammars share."""

    def __init__(self, rules: str, rule_for_tool: Mapping[str, str], string_rule: str) -> None:
        self.rules = rules
        self.rule_for_tool = dict(rule_for_tool)
        self.string_rule = string_rule  # a JSON string, for free text in a call format


_STRING_SCHEMA = {"type": "string"}


def arguments_grammar(schemas: Mapping[str, dict[str, Any]]) -> ArgumentRules:
    """Rules for each tool's argument schema (``{name: schema}``). Raises
    :class:`InvalidRequest` (field ``tools``) for a schema the converter cannot express or
    rules over the grammar bound."""
    converter = SchemaConverter(  # type: ignore[no-untyped-call]
        prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
    )
    rule_for_tool: dict[str, str] = {}
    try:
        for index, (name, schema) in enumerate(schemas.items()):
            resolved = converter.resolve_refs(json.loads(json.dumps(schema)), f"tool-{index}")
            rule = converter.visit(resolved, f"tool-{index}-args")  # type: ignore[no-untyped-call]
            rule_for_tool[name] = str(rule)
        string_rule = converter.visit(_STRING_SCHEMA, "call-string")  # type: ignore[no-untyped-call]
    except RecursionError:
        raise InvalidRequest(
            "a tool's parameter schema is nested too deeply", field="tools"
        ) from None
    except Exception as exc:  # the converter reports with asserts, KeyError, ValueError ...
        detail = str(exc) or type(exc).__name__
        raise InvalidRequest(
            f"a tool's parameter schema cannot be enforced: {detail}", field="tools"
        ) from None
    rules: str = converter.format_grammar()  # type: ignore[no-untyped-call]
    if len(rules.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise InvalidRequest(
            f"the tools' parameter schemas make a grammar over {MAX_GRAMMAR_BYTES} bytes",
            field="tools",
        )
    return ArgumentRules(rules, rule_for_tool, str(string_rule))
