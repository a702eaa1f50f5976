"""The generic format's prompt: for a template without tool support, the tools are
described in a system message and the history's calls and results become text the
template can render (its own roles only)."""

from __future__ import annotations

import json
from collections.abc import Sequence

from modeld.types import ChatMessage, NamedToolChoice, Tool, ToolChoice

__all__ = ["generic_messages"]


def _instructions(tools: Sequence[Tool], tool_choice: ToolChoice | None) -> str:
    described = json.dumps(
        [
            {
                "name": t.function.name,
                "description": t.function.description,
                "parameters": t.function.parameters,
            }
            for t in tools
        ],
        ensure_ascii=False,
    )
    if isinstance(tool_choice, NamedToolChoice):
        must = f"You must call the tool {tool_choice.function.name!r}."
    elif tool_choice == "required":
        must = "You must call at least one tool."
    else:
        must = 'Answer directly with {"content": "your answer"} when no tool is needed.'
    return (
        "You can call these tools:\n"
        f"{described}\n"
        'To call tools, answer only with JSON: {"tool_calls": [{"name": "tool name", '
        '"arguments": {...}}]}. ' + must
    )


def generic_messages(
    messages: Sequence[ChatMessage], tools: Sequence[Tool], tool_choice: ToolChoice | None
) -> tuple[ChatMessage, ...]:
    """``messages`` with the tools described in the system message (the first one,
    extended, or a new one) and, for templates that know only system/user/assistant,
    earlier calls as the assistant's JSON and tool results as user turns."""
    out: list[ChatMessage] = []
    for message in messages:
        if message.tool_calls:
            calls = [
                {"name": c.function.name, "arguments": _object(c.function.arguments)}
                for c in message.tool_calls
            ]
            out.append(ChatMessage("assistant", json.dumps({"tool_calls": calls})))
        elif message.role == "tool":
            out.append(
                ChatMessage("user", f"Tool result ({message.tool_call_id}): {message.content}")
            )
        else:
            out.append(message)
    if tools and tool_choice != "none":
        text = _instructions(tools, tool_choice)
        if out and out[0].role == "system":
            out[0] = ChatMessage("system", f"{out[0].content}\n\n{text}")
        else:
            out.insert(0, ChatMessage("system", text))
    return tuple(out)


def _object(arguments: str) -> object:
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments
