"""Tool definitions as clients send them (OpenAI's ``tools``/``tool_choice`` shape, which
Ollama shares; the structs live in :mod:`modeld.types`, the leaf every layer imports) and
the checks made before any model is touched.

Every check raises :class:`~modeld.errors.InvalidRequest` naming the field (``tools``,
``tool_choice``, ``messages``), so the API layer answers 400 with ``param``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from modeld.errors import InvalidRequest
from modeld.types import (
    MAX_TOOLS,
    FunctionCall,
    MessageToolCall,
    NamedToolChoice,
    Tool,
    ToolChoice,
    ToolFunction,
)

__all__ = [
    "MAX_TOOLS",
    "FunctionCall",
    "MessageToolCall",
    "NamedToolChoice",
    "Tool",
    "ToolChoice",
    "ToolFunction",
    "check_tool_messages",
    "check_tools",
    "chosen_tools",
]


def check_tools(tools: Sequence[Tool], tool_choice: ToolChoice | None) -> None:
    """Refuse too many tools, duplicate names, a parameter schema that is not an object
    schema, and a ``tool_choice`` naming no tool. Schemas the grammar converter cannot
    express are refused by :func:`modeld.tools.schema.arguments_grammar`."""
    if len(tools) > MAX_TOOLS:
        raise InvalidRequest(f"at most {MAX_TOOLS} tools are accepted", field="tools")
    seen: set[str] = set()
    for index, tool in enumerate(tools):
        name = tool.function.name
        if name in seen:
            raise InvalidRequest(f"tools[{index}]: duplicate function name {name!r}", field="tools")
        seen.add(name)
        schema_type = tool.function.parameters.get("type", "object")
        if schema_type != "object":
            raise InvalidRequest(
                f"tools[{index}].function.parameters must be an object schema", field="tools"
            )
    if isinstance(tool_choice, NamedToolChoice) and tool_choice.function.name not in seen:
        raise InvalidRequest(
            f"tool_choice names {tool_choice.function.name!r}, which is not among the tools",
            field="tool_choice",
        )
    if tool_choice == "required" and not tools:
        raise InvalidRequest('tool_choice "required" needs at least one tool', field="tool_choice")


def chosen_tools(tools: Sequence[Tool], tool_choice: ToolChoice | None) -> tuple[Tool, ...]:
    """The tools a grammar may call under ``tool_choice`` (none for ``"none"``)."""
    if tool_choice == "none":
        return ()
    if isinstance(tool_choice, NamedToolChoice):
        return tuple(t for t in tools if t.function.name == tool_choice.function.name)
    return tuple(tools)


def check_tool_messages(messages: Sequence[Any]) -> None:
    """Every ``tool`` message answers a call an earlier ``assistant`` message made
    (``messages`` are :class:`modeld.types.ChatMessage`)."""
    called: set[str] = set()
    for index, message in enumerate(messages):
        for call in message.tool_calls or ():
            called.add(call.id)
        if message.role == "tool" and message.tool_call_id not in called:
            raise InvalidRequest(
                f"messages[{index}]: a tool message answers no earlier tool call "
                f"(tool_call_id {message.tool_call_id!r})",
                field="messages",
            )
