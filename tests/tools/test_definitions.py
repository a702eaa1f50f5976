"""Bad tool input is refused before any model is touched, naming the field."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from modeld.errors import InvalidRequest
from modeld.tools import (
    MAX_TOOLS,
    Tool,
    ToolFormat,
    check_tool_messages,
    check_tools,
    chosen_tools,
    forced_grammar,
)
from modeld.types import ChatMessage, ChatRequest, FunctionCall, MessageToolCall, NamedToolChoice


def tool(name: str, parameters: dict[str, Any] | None = None) -> Tool:
    function: dict[str, Any] = {"name": name}
    if parameters is not None:
        function["parameters"] = parameters
    return msgspec.convert({"type": "function", "function": function}, Tool)


def named(name: str) -> NamedToolChoice:
    return msgspec.convert({"type": "function", "function": {"name": name}}, NamedToolChoice)


def refused(field: str) -> Any:
    return pytest.raises(InvalidRequest, check=lambda exc: exc.field == field)


def test_good_tools_pass() -> None:
    tools = [tool("a"), tool("b", {"type": "object", "properties": {"x": {"type": "integer"}}})]
    check_tools(tools, "auto")
    check_tools(tools, named("b"))
    assert chosen_tools(tools, named("b")) == (tools[1],)
    assert chosen_tools(tools, "none") == ()


def test_duplicate_names() -> None:
    with refused("tools"):
        check_tools([tool("a"), tool("a")], "auto")


def test_unknown_tool_choice_name() -> None:
    with refused("tool_choice"):
        check_tools([tool("a")], named("b"))


def test_required_without_tools() -> None:
    with refused("tool_choice"):
        check_tools([], "required")


def test_too_many_tools() -> None:
    with refused("tools"):
        check_tools([tool(f"t{i}") for i in range(MAX_TOOLS + 1)], "auto")


def test_the_wire_bounds_refuse_too_many_tools_and_bad_names() -> None:
    body = {
        "messages": [],
        "tools": [msgspec.to_builtins(tool(f"t{i}")) for i in range(MAX_TOOLS + 1)],
    }
    with pytest.raises(msgspec.ValidationError, match="tools"):
        msgspec.convert(body, ChatRequest)
    with pytest.raises(msgspec.ValidationError, match="name"):
        msgspec.convert({"type": "function", "function": {"name": "no spaces"}}, Tool)


def test_a_parameter_schema_that_is_not_an_object() -> None:
    with refused("tools"):
        check_tools([tool("a", {"type": "string"})], "auto")


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"x": {"$ref": "https://example.com/s.json"}}},
        {"type": "object", "properties": {"x": {"type": "no-such-type"}}},
        {"type": "object", "properties": {"x": {"enum": [f"v{i}" * 60 for i in range(3000)]}}},
    ],
    ids=["remote-ref", "unknown-type", "too-large"],
)
def test_a_schema_the_grammar_cannot_hold(schema: dict[str, Any]) -> None:
    with refused("tools[0].function.parameters"):  # the bounded converter names the tool
        forced_grammar(ToolFormat.HERMES, [tool("a", schema)], parallel=False)


def test_a_tool_message_must_answer_an_earlier_call() -> None:
    call = MessageToolCall(id="c1", function=FunctionCall(name="a", arguments="{}"))
    check_tool_messages(
        [ChatMessage("assistant", tool_calls=(call,)), ChatMessage("tool", "ok", tool_call_id="c1")]
    )
    with refused("messages"):
        check_tool_messages([ChatMessage("tool", "ok", tool_call_id="c1")])
    with refused("messages"):
        check_tool_messages(
            [ChatMessage("assistant", tool_calls=(call,)), ChatMessage("tool", "x")]
        )
