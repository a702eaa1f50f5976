"""Objects and arrays of a JSON schema as GBNF (the containers of
:class:`~modeld.grammar.schema.SchemaConverter`).

Properties come in the order the schema lists them, the required ones always, each
optional one at most once (a chain of rules, linear in their number); properties beyond
those listed only when ``additionalProperties`` asks for them, or when none are listed.
Arrays repeat one item rule, so ``maxItems`` costs a rule reference per copy in
llama.cpp, not a schema's worth.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from modeld.grammar.gbnf import literal

if TYPE_CHECKING:
    from modeld.grammar.schema import SchemaConverter

__all__ = ["array_rule", "object_rule"]


def _key_value(conv: SchemaConverter, key: str, value_rule: str) -> str:
    ws = conv.primitive("ws")
    quoted = literal(json.dumps(key, ensure_ascii=False))
    return f'{quoted} {ws} ":" {ws} {value_rule}'


def object_rule(conv: SchemaConverter, schema: dict[str, Any], name: str) -> str:
    rules = conv.rules
    properties = schema.get("properties", {})
    required = schema.get("required", [])
    if not isinstance(properties, dict) or not isinstance(required, list):
        raise rules.refuse("properties must be an object and required a list")
    missing = [key for key in required if key not in properties]
    # JSON Schema's default is any further property; with properties listed, the grammar
    # writes none (fewer documents, all valid); with none listed, any object
    extra = schema.get("additionalProperties", not properties)
    if missing and extra is False:
        raise rules.refuse(f"required property {missing[0]!r} has no schema in properties")
    ws = conv.primitive("ws")
    wanted = [key for key in properties if key in required] + [
        k for k in missing if isinstance(k, str)
    ]
    optional = [key for key in properties if key not in required]
    pairs = {key: _key_value(conv, key, conv.convert(properties.get(key, True), f"{name}-{key}"))
             for key in [*wanted, *optional]}  # fmt: skip
    extra_pair = None
    if extra is not False:
        value = conv.convert(extra, f"{name}-additional")
        extra_pair = rules.define(
            f"{name}-additional-kv", f'{conv.primitive("string")} {ws} ":" {ws} {value}'
        )
    low, high = schema.get("minProperties", 0), schema.get("maxProperties")
    if not properties and extra_pair is not None:
        if low == 0 and high is None:
            body = f'"{{" {ws} ({extra_pair} ("," {ws} {extra_pair})*)? {ws} "}}"'
        elif high == 0:
            body = f'"{{" {ws} "}}"'
        else:
            more = rules.repeat(f'("," {ws} {extra_pair})', max(low - 1, 0),
                                None if high is None else high - 1)  # fmt: skip
            body = f'"{{" {ws} {extra_pair} {more} {ws} "}}"'
            if low == 0:
                body = f'"{{" {ws} ({extra_pair} {more})? {ws} "}}"'
        return rules.define(name, body)
    possible = None if extra_pair is not None else len(wanted) + len(optional)
    if low > len(wanted) or (high is not None and (possible is None or high < possible)):
        raise rules.unenforceable(
            "minProperties/maxProperties beside properties, unless the required "
            "properties meet them"
        )
    tail_items = [pairs[key] for key in optional]
    if extra_pair is not None:
        tail_items.append(f'{extra_pair} ("," {ws} {extra_pair})*')
    tail = _optional_chain(conv, tail_items, name)
    head = f' "," {ws} '.join(pairs[key] for key in wanted)
    if head and tail:
        inner = f'{head} ("," {ws} {tail})?'
    elif head:
        inner = head
    elif tail:
        inner = f"({tail})?"
    else:
        inner = '""'
    return rules.define(name, f'"{{" {ws} {inner} {ws} "}}"')


def _optional_chain(conv: SchemaConverter, items: list[str], name: str) -> str | None:
    """A rule for any in-order selection of at least one of ``items``, comma-separated:
    ``opt-i ::= item-i ("," opt-(i+1))? | opt-(i+1)``: one rule per item."""
    if not items:
        return None
    rules = conv.rules
    ws = conv.primitive("ws")
    following: str | None = None
    for index in range(len(items) - 1, -1, -1):
        if following is None:
            body = items[index]
        else:
            body = f'{items[index]} ("," {ws} {following})? | {following}'
        following = rules.define(f"{name}-opt-{index}", body)
    return following


def array_rule(conv: SchemaConverter, schema: dict[str, Any], name: str) -> str:
    rules = conv.rules
    ws = conv.primitive("ws")
    low, high = schema.get("minItems", 0), schema.get("maxItems")
    prefix = schema.get("prefixItems", [])
    # JSON Schema allows any items after prefixItems; the grammar writes the tuple alone
    # unless minItems asks for more (fewer documents, all valid)
    items = schema.get("items", not prefix or low > len(prefix))
    if not isinstance(prefix, list):
        raise rules.refuse("prefixItems must be a list of schemas")
    if isinstance(items, list):  # draft 4's tuple form
        prefix, items = items, schema.get("additionalItems", False)
    parts = [conv.convert(item, f"{name}-{index}") for index, item in enumerate(prefix)]
    if prefix:
        if low > len(prefix) and items is False:
            raise rules.refuse(f"minItems {low} is over the {len(prefix)} prefixItems")
        if high is not None and high < len(prefix):
            raise rules.refuse(f"maxItems {high} is under the {len(prefix)} prefixItems")
    head = f' "," {ws} '.join(parts)
    if items is False:
        return rules.define(name, f'"[" {ws} {head} {ws} "]"' if head else f'"[" {ws} "]"')
    item = conv.convert(items, f"{name}-item")
    more_low = max(low - len(prefix), 0)
    more_high = None if high is None else high - len(prefix)
    if head:
        more = rules.repeat(f'("," {ws} {item})', more_low, more_high)
        return rules.define(name, f'"[" {ws} {head} {more} {ws} "]"')
    if more_high == 0:
        return rules.define(name, f'"[" {ws} "]"')
    rest = rules.repeat(f'("," {ws} {item})', max(more_low - 1, 0),
                        None if more_high is None else more_high - 1)  # fmt: skip
    inner = f"{item} {rest}" if more_low else f"({item} {rest})?"
    return rules.define(name, f'"[" {ws} {inner} {ws} "]"')
