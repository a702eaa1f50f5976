"""JSON schemas of tool arguments as GBNF rules, behind ONE function.

:func:`arguments_grammar` is the single seam to the schema converter: modeld's bounded
one (:mod:`modeld.grammar`), so a tool's parameter schema has the same bounds as
structured output's, checked before and while it is converted, each refusal naming the
tool's ``parameters``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from modeld.grammar import SchemaGrammar

__all__ = ["ArgumentRules", "arguments_grammar"]


class ArgumentRules:
    """GBNF rules (no ``root``) with one rule per tool for its arguments, plus a
    ``string`` rule the call grammars share."""

    def __init__(self, rules: str, rule_for_tool: Mapping[str, str], string_rule: str) -> None:
        self.rules = rules
        self.rule_for_tool = dict(rule_for_tool)
        self.string_rule = string_rule  # a JSON string, for free text in a call format


def arguments_grammar(schemas: Mapping[str, dict[str, Any]]) -> ArgumentRules:
    """Rules for each tool's argument schema (``{name: schema}``, in the request's order).

    Raises :class:`InvalidRequest` naming ``tools[i].function.parameters`` for a schema
    over a bound or one the grammar cannot enforce, or ``tools`` when the rules together
    spend the grammar budget.
    """
    grammar = SchemaGrammar(param="tools")
    rule_for_tool = {
        name: grammar.add(
            schema, root=f"tool-{index}-args", param=f"tools[{index}].function.parameters"
        )
        for index, (name, schema) in enumerate(schemas.items())
    }
    string_rule = grammar.json_rule("string")
    return ArgumentRules(grammar.text(), rule_for_tool, string_rule)
