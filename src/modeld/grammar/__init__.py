"""JSON schemas as GBNF grammars for llama.cpp's grammar sampler, bounded before and
while they are converted.

A schema comes from a request, so it is untrusted: a 220-byte schema asking for
``maxLength: 10**9`` must be a 400 in milliseconds, not a grammar that takes the host.
Two layers keep it so:

1. :func:`~modeld.grammar.limits.check_schema_bounds` refuses, before any conversion,
   a schema over one of :class:`SchemaLimits`' bounds (size, depth, properties per
   object, enum values, branches, repetition counts, pattern length);
2. the converter charges every rule it makes, and every repetition at the size llama.cpp
   expands it to, to a budget (:class:`~modeld.grammar.gbnf.RuleSet`) and stops the
   moment the budget is spent, so a shape no bound names still cannot grow.

Every refusal is an :class:`~modeld.errors.InvalidRequest` whose ``field`` is the
``param`` the caller names (``format``, ``response_format``, ``tools[0].parameters``) and
whose message says which bound, with its value.

Public names
------------
:func:`schema_grammar`
    ``schema_grammar(schema, *, param)``: the complete GBNF text (root rule ``root``).
:class:`SchemaGrammar`
    For composing grammars (tool calls): several schemas, each under a root rule name
    the caller picks, plus the caller's own rules, in one rule set and one budget::

        grammar = SchemaGrammar(param="tools")
        args = grammar.add(schema, root="weather-args", param="tools[0].parameters")
        grammar.define("root", f'"{{\\"name\\": \\"weather\\", \\"arguments\\": " {args} "}}"')
        text = grammar.text()

    :meth:`SchemaGrammar.add` returns the rule name actually used (``root`` made unique
    if taken). The generic JSON rules are ``json-value``, ``json-string``, ``json-ws``,
    ... (names starting ``json-`` are never given to a schema's rules);
    :meth:`SchemaGrammar.json_rule` defines one and returns its name.
:class:`SchemaLimits`, :data:`DEFAULT_LIMITS`
    The bounds, one definition each; :class:`BudgetUsage` is what a grammar cost.

What the grammar enforces (and what it refuses) is in docs/compat.md.
"""

from __future__ import annotations

from modeld.grammar.gbnf import BudgetUsage, RuleSet
from modeld.grammar.limits import DEFAULT_LIMITS, SchemaLimits, check_schema_bounds
from modeld.grammar.raw import check_grammar_bounds
from modeld.grammar.schema import SchemaConverter

__all__ = [
    "DEFAULT_LIMITS",
    "BudgetUsage",
    "SchemaGrammar",
    "SchemaLimits",
    "check_grammar_bounds",
    "schema_grammar",
]


class SchemaGrammar:
    """One grammar under construction: schemas and caller rules, one budget."""

    def __init__(self, *, param: str, limits: SchemaLimits = DEFAULT_LIMITS) -> None:
        self._rules = RuleSet(limits, param)
        self._param = param

    def add(self, schema: object, *, root: str, param: str | None = None) -> str:
        """Rules for ``schema`` under a rule named ``root`` (or ``root-N`` if taken);
        returns that name. Raises :class:`~modeld.errors.InvalidRequest` naming
        ``param`` (default: this grammar's) for a schema over a bound or one that cannot
        be enforced."""
        field = param or self._param
        check_schema_bounds(schema, param=field, limits=self._rules.limits)
        self._rules.param = field
        try:
            converter = SchemaConverter(self._rules, schema)
            body = converter.convert(schema, f"{root}-body")
            name = self._rules.reserve(root)
            self._rules.set(name, body)
            return name
        finally:
            self._rules.param = self._param

    def define(self, name: str, body: str) -> str:
        """A caller's own rule (charged to the same budget); returns the name used."""
        return self._rules.define(name, body)

    def json_rule(self, kind: str) -> str:
        """The generic JSON rule for ``kind`` (``"value"``, ``"string"``, ``"ws"``, ...)."""
        return SchemaConverter(self._rules, None).primitive(kind)

    def usage(self) -> BudgetUsage:
        return self._rules.usage()

    def text(self) -> str:
        return self._rules.text()


def schema_grammar(
    schema: object, *, param: str = "format", limits: SchemaLimits = DEFAULT_LIMITS
) -> str:
    """The GBNF text enforcing ``schema`` (root rule ``root``). Raises
    :class:`~modeld.errors.InvalidRequest` (``field=param``)."""
    grammar = SchemaGrammar(param=param, limits=limits)
    grammar.add(schema, root="root")
    return grammar.text()
