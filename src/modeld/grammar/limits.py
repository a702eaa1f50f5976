"""The bounds on a JSON schema, checked before any grammar is built.

:func:`check_schema_bounds` walks the schema once, without recursion, and refuses
(:class:`~modeld.errors.InvalidRequest` naming the caller's field, saying which bound and
its value) what would make the conversion or the grammar large: the schema's size, its
nesting depth, the properties of one object, enum values, ``anyOf``/``oneOf``/``allOf``
branches, repetition counts (``minLength``/``maxLength``, ``minItems``/``maxItems``,
``minProperties``/``maxProperties``) and ``pattern`` length. The walk costs time linear
in the schema, which the request body limit already bounds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import orjson

from modeld.errors import InvalidRequest

__all__ = ["DEFAULT_LIMITS", "REPETITION_KEYWORDS", "SchemaLimits", "check_schema_bounds"]

REPETITION_KEYWORDS = (
    "minLength", "maxLength", "minItems", "maxItems", "minProperties", "maxProperties",
)  # fmt: skip
_BRANCH_KEYWORDS = ("anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("properties", "$defs", "definitions")
_SCHEMA_VALUES = ("items", "additionalItems", "additionalProperties", "not", "contains")


@dataclass(frozen=True, slots=True)
class SchemaLimits:
    """Every bound on a schema and on the grammar made from it (one definition each)."""

    max_schema_bytes: int = 64 * 1024
    max_depth: int = 32
    max_properties: int = 256
    max_enum_values: int = 512
    max_branches: int = 64
    max_repetition: int = 2000  # llama.cpp's MAX_REPETITION_THRESHOLD
    max_pattern_chars: int = 512
    max_pattern_depth: int = 16
    max_grammar_bytes: int = 256 * 1024
    max_rules: int = 8192
    max_expanded_bytes: int = 2 * 1024 * 1024


DEFAULT_LIMITS = SchemaLimits()


def check_schema_bounds(
    schema: object, *, param: str, limits: SchemaLimits = DEFAULT_LIMITS
) -> None:
    """Raises :class:`InvalidRequest` (``field=param``) for the first bound ``schema``
    passes; returns None when it is within all of them."""
    size_bytes = _size_bytes(schema, param, limits)
    if size_bytes > limits.max_schema_bytes:
        raise InvalidRequest(
            f"the JSON schema is {size_bytes} bytes, over the {limits.max_schema_bytes} bound",
            field=param,
        )
    for node, depth, where in _walk(schema):
        if depth > limits.max_depth:
            raise InvalidRequest(
                f"the JSON schema is nested over {limits.max_depth} levels deep (at {where})",
                field=param,
            )
        _check_node(node, where, param, limits)


def _size_bytes(schema: object, param: str, limits: SchemaLimits) -> int:
    """The schema's size as compact JSON (orjson; the standard library for integers past
    64 bits). Raises :class:`InvalidRequest` past orjson's 255 levels of nesting."""
    try:
        return len(orjson.dumps(schema))
    except orjson.JSONEncodeError as exc:
        if "ecursion" in str(exc):
            raise InvalidRequest(
                f"the JSON schema is nested over {limits.max_depth} levels deep", field=param
            ) from None
    try:
        return len(json.dumps(schema, separators=(",", ":")))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"the JSON schema is not JSON: {exc}", field=param) from None


def _walk(schema: object) -> Iterator[tuple[dict[str, Any], int, str]]:
    """Every subschema (a dict) with its depth and a JSON-pointer-like location."""
    stack: list[tuple[object, int, str]] = [(schema, 0, "#")]
    while stack:
        node, depth, where = stack.pop()
        if not isinstance(node, dict):
            continue
        yield node, depth, where
        for key in _SCHEMA_VALUES:
            stack.append((node.get(key), depth + 1, f"{where}/{key}"))
        for key in _SCHEMA_MAPS:
            children = node.get(key)
            if isinstance(children, dict):
                stack.extend((child, depth + 1, f"{where}/{key}") for child in children.values())
        for key in (*_BRANCH_KEYWORDS, "prefixItems"):
            children = node.get(key)
            if isinstance(children, list):
                stack.extend((child, depth + 1, f"{where}/{key}") for child in children)


def _check_node(node: dict[str, Any], where: str, param: str, limits: SchemaLimits) -> None:
    def refuse(message: str) -> InvalidRequest:
        return InvalidRequest(f"{message} (at {where})", field=param)

    for keyword in REPETITION_KEYWORDS:
        value = node.get(keyword)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise refuse(f"{keyword} must be a non-negative integer")
        if value > limits.max_repetition:
            raise refuse(f"{keyword} {value} is over the {limits.max_repetition} bound")
    properties = node.get("properties")
    if isinstance(properties, dict) and len(properties) > limits.max_properties:
        raise refuse(
            f"an object with {len(properties)} properties is over the {limits.max_properties} bound"
        )
    enum = node.get("enum")
    if isinstance(enum, list) and len(enum) > limits.max_enum_values:
        raise refuse(f"an enum of {len(enum)} values is over the {limits.max_enum_values} bound")
    for keyword in (*_BRANCH_KEYWORDS, "prefixItems"):
        branches = node.get(keyword)
        if isinstance(branches, list) and len(branches) > limits.max_branches:
            raise refuse(
                f"{keyword} with {len(branches)} schemas is over the {limits.max_branches} bound"
            )
    pattern = node.get("pattern")
    if isinstance(pattern, str) and len(pattern) > limits.max_pattern_chars:
        raise refuse(
            f"a pattern of {len(pattern)} characters is over the {limits.max_pattern_chars} bound"
        )
    required = node.get("required")
    if isinstance(required, list) and len(required) > limits.max_properties:
        raise refuse(
            f"required lists {len(required)} names, over the {limits.max_properties} bound"
        )
