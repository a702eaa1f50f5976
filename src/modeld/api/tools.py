"""Tool calling on the wire, for every protocol that takes it (OpenAI chat, Ollama chat).

Both send OpenAI's ``tools``/``tool_choice`` shape; they differ in how calls come back
(OpenAI: ``arguments`` as JSON text and an ``id``; Ollama: ``arguments`` as an object,
no id, ``tool`` turns naming the function). The checks (duplicate names, an unknown
function in ``tool_choice``, a bad schema, a ``tool`` turn answering no call) are
:func:`modeld.tools.check_tool_request`'s, made by the scheduler before any model is
touched; the parsing of the output is the generation's (``Chunk.tool_calls``,
``GenerationResult.tool_calls``). Here: the wire's shapes only.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from modeld.errors import InvalidRequest
from modeld.tools.parser import collect
from modeld.types import (
    DoneReason,
    FunctionCall,
    GenerationResult,
    MessageToolCall,
    Tool,
    ToolCallDelta,
    ToolChoice,
)

__all__ = [
    "finish_reason",
    "ollama_calls",
    "ollama_history_calls",
    "openai_call_delta",
    "openai_calls",
    "openai_history_calls",
    "tool_fields",
]


def _convert(value: object, kind: Any, field: str) -> Any:
    try:
        return msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"{field}: {exc}", field=field) from None


def tool_fields(
    tools: list[Any] | None,
    tool_choice: Any = None,
    parallel: bool | None = None,
    *,
    default_type: bool = False,
) -> dict[str, object]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` as :class:`ChatRequest`
    fields (a 400 naming the field for a wrong shape). ``default_type``: a tool without
    ``type`` is a function tool (the ollama client may leave it out)."""
    fields: dict[str, object] = {}
    if tools:
        if default_type:
            tools = [{"type": "function", **t} if isinstance(t, dict) else t for t in tools]
        fields["tools"] = msgspec.to_builtins(_convert(tools, tuple[Tool, ...], "tools"))
    if tool_choice is not None:
        fields["tool_choice"] = msgspec.to_builtins(
            _convert(tool_choice, ToolChoice, "tool_choice")
        )
    if parallel is not None:
        fields["parallel_tool_calls"] = parallel
    return fields


def openai_history_calls(raw: object, where: str) -> tuple[MessageToolCall, ...]:
    """An ``assistant`` message's ``tool_calls`` (``arguments`` as JSON text, which the
    chat template receives as an object)."""
    calls: tuple[MessageToolCall, ...] = _convert(
        raw, tuple[MessageToolCall, ...], f"{where}.tool_calls"
    )
    return calls


def ollama_history_calls(raw: list[Any], first_id: int) -> tuple[MessageToolCall, ...]:
    """An Ollama ``assistant`` message's ``tool_calls`` (``arguments`` an object, no
    id): ids ``call_<n>`` numbered from ``first_id`` across the conversation."""
    calls = []
    for offset, call in enumerate(raw):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            raise InvalidRequest("a tool call is {function: {name, arguments}}", field="messages")
        arguments = function.get("arguments", {})
        text = arguments if isinstance(arguments, str) else json.dumps(arguments)
        named = {"name": function.get("name"), "arguments": text}
        calls.append(
            MessageToolCall(
                id=f"call_{first_id + offset}",
                function=_convert(named, FunctionCall, "messages"),
            )
        )
    return tuple(calls)


def finish_reason(result: GenerationResult) -> str:
    """OpenAI's ``finish_reason``: ``tool_calls`` when the answer made calls."""
    if result.tool_calls and result.done_reason is DoneReason.STOP:
        return "tool_calls"
    return str(result.done_reason)  # "stop" or "length": the others never get here


def openai_calls(calls: tuple[MessageToolCall, ...]) -> list[dict[str, object]]:
    """``message.tool_calls`` of a whole answer."""
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in calls
    ]


def openai_call_delta(delta: ToolCallDelta) -> dict[str, object]:
    """One streamed piece of a call: its index, id, type and name first (arguments
    empty), then its ``arguments`` text."""
    if delta.name is not None:
        function = {"name": delta.name, "arguments": ""}
        return {"index": delta.index, "id": delta.id, "type": "function", "function": function}
    return {"index": delta.index, "function": {"arguments": delta.arguments}}


def ollama_calls(
    calls: tuple[MessageToolCall, ...] | tuple[ToolCallDelta, ...],
) -> list[dict[str, object]]:
    """``message.tool_calls`` as Ollama writes them: ``arguments`` an object, and the
    call's ``index``. Deltas (a stream's chunk) hold whole calls: a call's head and its
    arguments come out together."""
    first = 0
    whole: tuple[MessageToolCall, ...] = ()
    deltas = [c for c in calls if isinstance(c, ToolCallDelta)]
    if deltas:
        first, whole = deltas[0].index, collect(list(deltas))[1]
    else:
        whole = tuple(c for c in calls if isinstance(c, MessageToolCall))
    return [
        {
            "function": {
                "index": first + offset,
                "name": c.function.name,
                "arguments": json.loads(c.function.arguments),
            }
        }
        for offset, c in enumerate(whole)
    ]
