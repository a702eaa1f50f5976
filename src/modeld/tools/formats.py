"""Tool-call formats: which one a chat template speaks, and for each the grammar that
forces a call (``required``, a named function), the lazy grammar and triggers for
``auto``, and (in :mod:`modeld.tools.parser`) how its output is read back.

* ``hermes``: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, repeated
  (Hermes, Qwen 2.5/3 templates);
* ``llama3``: ``{"name": ..., "parameters": {...}}`` as the whole answer, after an
  optional ``<|python_tag|>``;
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]``;
* ``generic``: ``{"tool_calls": [{"name": ..., "arguments": {...}}]}`` (or, under
  ``auto``, ``{"content": "..."}``), for templates without tool support: the tools are
  described in a system message.
"""

from __future__ import annotations

import enum
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from modeld.tools.definitions import Tool
from modeld.tools.schema import ArgumentRules, arguments_grammar
from modeld.types import GrammarConstraint

__all__ = [
    "ToolFormat",
    "detect_format",
    "forced_grammar",
    "lazy_grammar",
    "resolve_format",
    "trigger_matches",
]


class ToolFormat(enum.StrEnum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"
    GENERIC = "generic"


@dataclass(frozen=True)
class _Shape:
    """How one format writes calls, as GBNF fragments around ``call``/``call-body``, and
    the regex that sets off its lazy grammar.

    A trigger must match only text the grammar accepts from its start: llama.cpp feeds
    the grammar the output from the trigger's group on, and a piece the grammar refuses
    there is a C++ exception no C caller can catch (the process aborts). So each pattern
    is anchored at the end of the output (``[ \\n]?$``): it fires on the token that completes
    the opening and never later, and the grammar allows that one optional space/newline.
    """

    arguments_key: str
    root: str  # GBNF for the whole answer, in terms of `call`
    parallel_root: str
    call: str  # GBNF for one call, in terms of `call-body`
    trigger: str  # a regex for llama.cpp (std::regex, ECMAScript); "" when not lazy


_SHAPES = {
    ToolFormat.HERMES: _Shape(
        "arguments", "call", 'call ( ws call )*',
        '"<tool_call>" ws call-body ws "</tool_call>"',
        r"^[\s\S]*?(<tool_call>)[ \n]?$",
    ),
    ToolFormat.LLAMA3: _Shape(
        "parameters", "call", 'call ( ";" ws call )*', "call-body",
        r"^(?:<\|python_tag\|>)?[ \n]*(\{)[ \n]?$",
    ),
    ToolFormat.MISTRAL: _Shape(
        "arguments", '"[TOOL_CALLS]" ws "[" ws call ws "]"',
        '"[TOOL_CALLS]" ws "[" ws call ( ws "," ws call )* ws "]"', "call-body",
        r"^[\s\S]*?(\[TOOL_CALLS\])[ \n]?$",
    ),
    ToolFormat.GENERIC: _Shape(
        "arguments", '"{" ws "\\"tool_calls\\"" ws ":" ws "[" ws call ws "]" ws "}"',
        '"{" ws "\\"tool_calls\\"" ws ":" ws "[" ws call ( ws "," ws call )* ws "]" ws "}"',
        "call-body", "",
    ),
}  # fmt: skip


def detect_format(template_source: str | None) -> ToolFormat:
    """The format a chat template's own tool support writes; ``generic`` without one."""
    source = template_source or ""
    if "<tool_call>" in source:
        return ToolFormat.HERMES
    if "[TOOL_CALLS]" in source:
        return ToolFormat.MISTRAL
    if "<|python_tag|>" in source or ("<|start_header_id|>" in source and "tools" in source):
        return ToolFormat.LLAMA3
    return ToolFormat.GENERIC


def resolve_format(template_source: str | None, override: str | None) -> ToolFormat:
    """A per-model override (a format's name) wins over detection. Raises ValueError for
    an unknown name (a configuration error, reported when the setting is read)."""
    if override is not None:
        try:
            return ToolFormat(override)
        except ValueError:
            names = ", ".join(f.value for f in ToolFormat)
            raise ValueError(f"unknown tool-call format {override!r} (one of {names})") from None
    return detect_format(template_source)


def _call_rules(fmt: ToolFormat, tools: Sequence[Tool], rules: ArgumentRules) -> str:
    shape = _SHAPES[fmt]
    alternatives = [
        f'"{{" ws "\\"name\\"" ws ":" ws {json.dumps(json.dumps(tool.function.name))} ws "," '
        f'ws "\\"{shape.arguments_key}\\"" ws ":" ws {rules.rule_for_tool[tool.function.name]} '
        'ws "}"'
        for tool in tools
    ]
    body = " | ".join(f"( {a} )" for a in alternatives)
    return f"call-body ::= {body}\ncall ::= {shape.call}\nws ::= [ \\n]?\n"


def forced_grammar(fmt: ToolFormat, tools: Sequence[Tool], *, parallel: bool) -> GrammarConstraint:
    """A grammar that holds the answer to one call (several with ``parallel``) of one of
    ``tools``, whose arguments match that tool's schema (``required``, or a named
    function when ``tools`` is that one). Raises InvalidRequest (field ``tools``) for a
    schema the converter cannot express."""
    return GrammarConstraint(gbnf=_grammar(fmt, tools, parallel=parallel, allow_content=False))


def lazy_grammar(fmt: ToolFormat, tools: Sequence[Tool], *, parallel: bool) -> GrammarConstraint:
    """``auto``: free text until the format's call opening, then a valid call. The
    generic format has no opening to wait for: its grammar allows an answer as
    ``{"content": ...}`` or calls (not lazy)."""
    shape = _SHAPES[fmt]
    if not shape.trigger:
        return GrammarConstraint(gbnf=_grammar(fmt, tools, parallel=parallel, allow_content=True))
    return GrammarConstraint(
        gbnf=_grammar(fmt, tools, parallel=parallel, allow_content=False),
        trigger_patterns=(shape.trigger,),
    )


def _grammar(fmt: ToolFormat, tools: Sequence[Tool], *, parallel: bool, allow_content: bool) -> str:
    shape = _SHAPES[fmt]
    rules = arguments_grammar({t.function.name: t.function.parameters for t in tools})
    calls = shape.parallel_root if parallel else shape.root
    if allow_content:
        content = f'"{{" ws "\\"content\\"" ws ":" ws {rules.string_rule} ws "}}"'
        calls = f"( {calls} ) | ( {content} )"
    return f"root ::= {calls}\n{_call_rules(fmt, tools, rules)}{rules.rules}\n"


def trigger_matches(fmt: ToolFormat, text: str) -> bool:
    """Whether ``text`` would set off ``fmt``'s lazy grammar (a test aid; llama.cpp
    matches with std::regex, which reads these patterns the same way)."""
    shape = _SHAPES[fmt]
    return bool(shape.trigger) and re.fullmatch(shape.trigger, text) is not None
