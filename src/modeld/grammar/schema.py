"""A JSON schema as GBNF rules, within a :class:`~modeld.grammar.gbnf.RuleSet`'s budget.

The grammar may accept fewer documents than the schema (an object gets no properties
beyond those listed unless ``additionalProperties`` asks for them; a tuple gets no
items past ``prefixItems``): whatever it lets the model write is valid. A keyword that
would make it accept an invalid document if ignored, and that a grammar cannot express
(``not``, ``uniqueItems``, ``multipleOf``, most numeric ranges, ...), is refused, naming
the keyword. ``format`` is enforced for ``date``, ``time``, ``date-time`` and ``uuid``
and otherwise treated as the annotation JSON Schema says it is by default.
"""

from __future__ import annotations

import json
from typing import Any

from modeld.grammar.gbnf import RuleSet, literal
from modeld.grammar.objects import array_rule, object_rule
from modeld.grammar.pattern import pattern_rule

__all__ = ["SchemaConverter"]

_UNENFORCEABLE = (
    "not", "if", "then", "else", "patternProperties", "dependentRequired",
    "dependentSchemas", "uniqueItems", "contains", "minContains", "maxContains",
    "propertyNames", "unevaluatedProperties", "unevaluatedItems", "multipleOf",
    "exclusiveMinimum", "exclusiveMaximum", "$dynamicRef", "$recursiveRef",
)  # fmt: skip
_BRANCHING = ("anyOf", "oneOf", "allOf", "enum", "const", "$ref")
_ANNOTATIONS = frozenset({
    "title", "description", "$schema", "$id", "$comment", "default", "examples",
    "deprecated", "readOnly", "writeOnly", "$defs", "definitions", "format", "strict",
    "contentEncoding", "contentMediaType", "$anchor",
})  # fmt: skip
_TYPES = ("string", "integer", "number", "boolean", "null", "object", "array")

# The generic JSON rules, under names no schema rule gets (RuleSet.reserve keeps
# "json-" for these): a caller composing grammars can refer to them too.
_PRIMITIVES = {
    "json-ws": '| " " | "\\n" [ \\t]{0,20}',
    "json-char": '[^"\\\\\\x7F\\x00-\\x1F] | [\\\\] (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})',
    "json-string": '"\\"" json-char* "\\""',
    "json-integer": '"-"? ("0" | [1-9] [0-9]{0,15})',
    "json-number": ('"-"? ("0" | [1-9] [0-9]{0,15}) ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?'),
    "json-boolean": '"true" | "false"',
    "json-null": '"null"',
    "json-value": (
        "json-object | json-array | json-string | json-number | json-boolean | json-null"
    ),
    "json-object": (
        '"{" json-ws (json-string json-ws ":" json-ws json-value '
        '("," json-ws json-string json-ws ":" json-ws json-value)*)? json-ws "}"'
    ),
    "json-array": '"[" json-ws (json-value ("," json-ws json-value)*)? json-ws "]"',
}
_COMPOSITE = ("json-ws", "json-char", "json-string", "json-number", "json-boolean",
              "json-null", "json-object", "json-array", "json-value")  # fmt: skip
_NEEDS = {"json-string": ("json-char",), "json-value": _COMPOSITE,
          "json-object": _COMPOSITE, "json-array": _COMPOSITE}  # fmt: skip
_TWO_DIGITS_HOUR = '([01] [0-9] | "2" [0-3])'
_FORMATS = {
    "date": '[0-9]{4} "-" ("0" [1-9] | "1" [0-2]) "-" ("0" [1-9] | [12] [0-9] | "3" [01])',
    "time": (
        f'{_TWO_DIGITS_HOUR} ":" [0-5] [0-9] ":" [0-5] [0-9] ("." [0-9]{{1,6}})? '
        f'("Z" | [+-] {_TWO_DIGITS_HOUR} ":" [0-5] [0-9])'
    ),
    "uuid": (
        '[0-9a-fA-F]{8} "-" [0-9a-fA-F]{4} "-" [0-9a-fA-F]{4} "-" '
        '[0-9a-fA-F]{4} "-" [0-9a-fA-F]{12}'
    ),
}
_FORMATS["date-time"] = f'{_FORMATS["date"]} "T" {_FORMATS["time"]}'


def _json_text(value: object) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


class SchemaConverter:
    """Rules for the subschemas of one document (``root``: the schema ``$ref`` points
    into); every rule and repetition is charged to ``rules`` as it is made."""

    def __init__(self, rules: RuleSet, root: object) -> None:
        self.rules = rules
        self.root = root
        self._refs: dict[str, str] = {}
        self._depth = 0

    def primitive(self, kind: str) -> str:
        """The generic rule for ``kind`` (``"value"``, ``"string"``, ``"ws"``, ...)."""
        name = f"json-{kind}"
        for needed in _NEEDS.get(name, ()):
            self.rules.define(needed, _PRIMITIVES[needed], fixed=True)
        return self.rules.define(name, _PRIMITIVES[name], fixed=True)

    def convert(self, schema: object, name: str) -> str:
        """The name of a rule for ``schema``'s JSON text. Raises ``InvalidRequest``."""
        self._depth += 1
        try:
            if self._depth > self.rules.limits.max_depth * 2:
                raise self.rules.refuse(
                    f"the JSON schema is nested (through $ref) over "
                    f"{self.rules.limits.max_depth * 2} levels deep"
                )
            return self._convert(schema, name)
        finally:
            self._depth -= 1

    def _convert(self, schema: object, name: str) -> str:
        if schema is True or schema == {}:
            return self.primitive("value")
        if schema is False:
            raise self.rules.refuse("the schema false matches nothing")
        if not isinstance(schema, dict):
            raise self.rules.refuse(f"a schema must be an object, not {_json_text(schema)[:40]}")
        for keyword in _UNENFORCEABLE:
            if keyword in schema:
                raise self.rules.unenforceable(f"keyword {keyword!r}")
        present = [key for key in _BRANCHING if key in schema]
        if len(present) > 1:
            raise self.rules.unenforceable(f"{' and '.join(present)} in one schema")
        if "$ref" in schema:
            return self._ref(schema["$ref"])
        if "const" in schema:
            return self.rules.define(name, literal(_json_text(schema["const"])))
        if "enum" in schema:
            return self._enum(schema["enum"], name)
        for keyword in ("anyOf", "oneOf", "allOf"):
            if keyword in schema:
                return self._branches(schema, keyword, name)
        kind = schema.get("type")
        if isinstance(kind, list):
            if not kind or len(kind) > len(_TYPES):
                raise self.rules.refuse(f"type lists {len(kind)} types")
            options = [self.convert({**schema, "type": one}, f"{name}-{one}") for one in kind]
            return self.rules.define(name, " | ".join(options))
        if kind is None:
            kind = self._implied_type(schema)
            if kind is None:
                return self.primitive("value")
        return self._typed(schema, kind, name)

    def _implied_type(self, schema: dict[str, Any]) -> str | None:
        if any(key in schema for key in ("properties", "additionalProperties", "required")):
            return "object"
        if any(key in schema for key in ("items", "prefixItems", "minItems", "maxItems")):
            return "array"
        if any(key in schema for key in ("pattern", "minLength", "maxLength")):
            return "string"
        unknown = [key for key in schema if key not in _ANNOTATIONS]
        if unknown:
            raise self.rules.unenforceable(f"keyword {unknown[0]!r}")
        return None

    def _typed(self, schema: dict[str, Any], kind: object, name: str) -> str:
        if kind == "string":
            return self._string(schema, name)
        if kind in ("integer", "number"):
            return self._number(schema, str(kind), name)
        if kind in ("boolean", "null"):
            return self.primitive(str(kind))
        if kind == "object":
            return object_rule(self, schema, name)
        if kind == "array":
            return array_rule(self, schema, name)
        raise self.rules.unenforceable(f"type {kind!r} is no JSON Schema type")

    def _ref(self, ref: object) -> str:
        if not isinstance(ref, str) or not ref.startswith("#/"):
            raise self.rules.unenforceable(
                f"$ref {ref!r}: only local references ('#/...') are followed"
            )
        known = self._refs.get(ref)
        if known is not None:
            return known
        target: object = self.root
        for part in ref[2:].split("/"):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise self.rules.unenforceable(f"$ref {ref!r} points at nothing")
            target = target[part]
        rule = self.rules.reserve("ref-" + ref[2:].split("/")[-1])
        self._refs[ref] = rule  # before converting: a recursive schema refers to it
        self.rules.set(rule, self.convert(target, rule + "-body"))
        return rule

    def _enum(self, values: object, name: str) -> str:
        if not isinstance(values, list) or not values:
            raise self.rules.refuse("enum must be a non-empty list")
        return self.rules.define(name, " | ".join(literal(_json_text(v)) for v in values))

    def _branches(self, schema: dict[str, Any], keyword: str, name: str) -> str:
        branches = schema[keyword]
        if not isinstance(branches, list) or not branches:
            raise self.rules.refuse(f"{keyword} must be a non-empty list of schemas")
        siblings = [key for key in schema if key not in _ANNOTATIONS and key != keyword]
        if siblings:
            raise self.rules.unenforceable(
                f"{keyword} beside {siblings[0]!r} (put it in each branch)"
            )
        if keyword == "allOf":
            if len(branches) != 1:
                raise self.rules.unenforceable("allOf with more than one schema")
            return self.convert(branches[0], name)
        options = [self.convert(branch, f"{name}-{i}") for i, branch in enumerate(branches)]
        return self.rules.define(name, " | ".join(options))

    def _string(self, schema: dict[str, Any], name: str) -> str:
        pattern = schema.get("pattern")
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if pattern is not None:
            if not isinstance(pattern, str):
                raise self.rules.refuse("pattern must be a string")
            if low or high is not None:
                raise self.rules.unenforceable("pattern with minLength/maxLength")
            return pattern_rule(pattern, self.rules, name)
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return self.rules.define(f"{fmt}-string", f'"\\"" {_FORMATS[fmt]} "\\""')
        if not low and high is None:
            return self.primitive("string")
        char = self.primitive("char")
        return self.rules.define(name, f'"\\"" {self.rules.repeat(char, low, high)} "\\""')

    def _number(self, schema: dict[str, Any], kind: str, name: str) -> str:
        if "maximum" in schema:
            raise self.rules.unenforceable("keyword 'maximum'")
        minimum = schema.get("minimum")
        if minimum is None:
            return self.primitive(kind)
        if isinstance(minimum, bool) or not isinstance(minimum, int | float):
            raise self.rules.refuse("minimum must be a number")
        if minimum == 0:
            digits = '("0" | [1-9] [0-9]{0,15})'
        elif minimum == 1 and kind == "integer":
            digits = "[1-9] [0-9]{0,15}"
        else:
            raise self.rules.unenforceable(f"minimum {minimum} (only 0, and 1 for an integer)")
        if kind == "number":
            digits += ' ("." [0-9]{1,16})? ([eE] [-+]? [0-9]{1,3})?'
        return self.rules.define(name, digits)
