"""The bounds on a raw GBNF grammar a client sends (llama-server's ``grammar`` field),
the same :class:`~modeld.grammar.SchemaLimits` a converted schema is held to: its size,
its rules, every counted repetition (``x{m,n}``) and what llama.cpp expands those to.

One scan, linear in the grammar, skipping string literals, character classes and
comments. The expansion is over-estimated per rule (its body's size times the product of
its repetition counts), so a grammar passing here cannot make llama.cpp build more than
``max_expanded_bytes``. Whether llama.cpp parses it is checked on the model's worker
(:func:`modeld.engine.grammar.check_grammar`), never by handing it a grammar it refuses
mid-answer.
"""

from __future__ import annotations

import re

from modeld.errors import InvalidRequest
from modeld.grammar.limits import DEFAULT_LIMITS, SchemaLimits

__all__ = ["check_grammar_bounds"]

_RULE = re.compile(r"^[ \t]*([A-Za-z0-9_-]+)[ \t]*::=", re.MULTILINE)
_COUNT = re.compile(r"\{\s*(\d{1,9})?\s*(,\s*(\d{1,9})?\s*)?\}")


def _skip(text: str, start: int, close: str) -> int:
    """The index past the ``close`` that ends a literal or class opened before
    ``start`` (escapes skipped); ``len(text)`` when it never closes."""
    index = start
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == close:
            return index + 1
        index += 1
    return len(text)


def _counts(body: str, param: str, limits: SchemaLimits) -> list[int]:
    """The largest count of each counted repetition in one rule's body."""
    counts: list[int] = []
    index = 0
    while index < len(body):
        char = body[index]
        if char == '"':
            index = _skip(body, index + 1, '"')
        elif char == "[":
            index = _skip(body, index + 1, "]")
        elif char == "#":
            newline = body.find("\n", index)
            index = len(body) if newline < 0 else newline
        elif char == "{":
            match = _COUNT.match(body, index)
            if match is None:
                raise InvalidRequest(f"{param}: a '{{' that is no repetition count", field=param)
            low, high = match.group(1), match.group(3)
            count = int(high or low or 0) if match.group(2) is None or high else int(low or 0)
            if count > limits.max_repetition:
                raise InvalidRequest(
                    f"{param}: a repetition of {count} is over the bound of "
                    f"{limits.max_repetition}",
                    field=param,
                )
            counts.append(max(count, 1))
            index = match.end()
        else:
            index += 1
    return counts


def check_grammar_bounds(grammar: str, *, param: str, limits: SchemaLimits = DEFAULT_LIMITS) -> str:
    """``grammar`` when it is within every bound; raises :class:`InvalidRequest`
    (``field=param``) naming the first one it passes."""
    size_bytes = len(grammar.encode("utf-8", errors="surrogatepass"))
    if "\x00" in grammar or not grammar.strip():
        raise InvalidRequest(f"{param}: an empty grammar, or one with NUL", field=param)
    if size_bytes > limits.max_grammar_bytes:
        raise InvalidRequest(
            f"{param}: the grammar is {size_bytes} bytes, over the bound of "
            f"{limits.max_grammar_bytes}",
            field=param,
        )
    starts = [match.start() for match in _RULE.finditer(grammar)]
    if len(starts) > limits.max_rules:
        raise InvalidRequest(
            f"{param}: {len(starts)} rules, over the bound of {limits.max_rules}", field=param
        )
    expanded_bytes = 0
    for start, end in zip(starts, [*starts[1:], len(grammar)], strict=True):
        body = grammar[start:end]
        product = 1
        for count in _counts(body, param, limits):
            product = min(product * count, limits.max_expanded_bytes + 1)
        expanded_bytes += len(body) * product
        if expanded_bytes > limits.max_expanded_bytes:
            raise InvalidRequest(
                f"{param}: the grammar's repetitions expand past the bound of "
                f"{limits.max_expanded_bytes} bytes",
                field=param,
            )
    return grammar
