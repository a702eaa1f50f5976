"""Tools and tool calls reach a chat template as transformers passes them: ``tools`` as
OpenAI-shaped JSON schemas, an assistant's ``tool_calls`` with object arguments, a tool's
``tool_call_id``; templates without tool support get the generic system message."""

from __future__ import annotations

import json

import msgspec

from modeld.chat import ChatTemplate
from modeld.tools import ToolFormat, detect_format, generic_messages
from modeld.types import ChatMessage, ChatRequest, FunctionCall, MessageToolCall, Tool
from tests.support.chat_templates import GEMMA3
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE
from tests.support.tool_templates import HERMES, LLAMA3, MISTRAL

WEATHER = msgspec.convert(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    Tool,
)
CALL = MessageToolCall(
    id="call_1", function=FunctionCall(name="get_weather", arguments='{"city": "Paris"}')
)
HISTORY = [
    ChatMessage("user", "Weather in Paris?"),
    ChatMessage("assistant", "", tool_calls=(CALL,)),
    ChatMessage("tool", "18 C, sunny", tool_call_id="call_1"),
]


def _render(source: str, messages: list[ChatMessage], tools: tuple[Tool, ...]) -> str:
    template = ChatTemplate(source, where="test")
    return template.render(
        messages, bos_token="<s>", eos_token="</s>", max_chars=10**6, tools=tools
    )


def test_hermes_renders_tools_calls_and_results() -> None:
    text = _render(HERMES, HISTORY, (WEATHER,))
    assert '{"type": "function", "function": {"name": "get_weather"' in text
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<tool_response>\n18 C, sunny\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_llama3_and_mistral_render_calls_with_object_arguments() -> None:
    llama = _render(LLAMA3, HISTORY, (WEATHER,))
    assert (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>' in llama
    )
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C, sunny<|eot_id|>" in llama
    mistral = _render(MISTRAL, [*HISTORY, ChatMessage("user", "And Rome?")], (WEATHER,))
    assert (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call_1"}]'
        in mistral
    )
    assert '"call_id": "call_1"' in mistral
    assert "[AVAILABLE_TOOLS]" in mistral


def test_arguments_that_are_not_a_json_object_stay_text() -> None:
    odd = MessageToolCall(id="c", function=FunctionCall(name="get_weather", arguments="not json"))
    text = _render(HERMES, [ChatMessage("assistant", "", tool_calls=(odd,))], ())
    assert '"arguments": "not json"' in text


def test_formats_are_detected_from_the_templates() -> None:
    assert detect_format(HERMES) is ToolFormat.HERMES
    assert detect_format(LLAMA3) is ToolFormat.LLAMA3
    assert detect_format(MISTRAL) is ToolFormat.MISTRAL
    assert detect_format(GEMMA3) is ToolFormat.GENERIC
    assert detect_format(None) is ToolFormat.GENERIC


def test_generic_messages_describe_the_tools_and_fold_calls_for_plain_templates() -> None:
    messages = generic_messages(HISTORY, (WEATHER,), "required")
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert "get_weather" in messages[0].content
    assert "must call" in messages[0].content
    assert json.loads(messages[2].content) == {
        "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]
    }
    assert messages[3].content == "Tool result (call_1): 18 C, sunny"
    text = _render(TINY_CHAT_TEMPLATE, list(messages), ())  # a template that refuses "tool"
    assert "<|system|>" in text
    assert generic_messages(HISTORY, (WEATHER,), "none")[0].role == "user"


def test_a_library_caller_may_pass_plain_mappings() -> None:
    request = ChatRequest(
        messages=[{"role": "tool", "content": "x", "tool_call_id": "c1"}],  # type: ignore[arg-type]
        tools=[msgspec.to_builtins(WEATHER)],  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},  # type: ignore[arg-type]
    )
    assert request.tools == (WEATHER,)
    assert request.messages[0].tool_call_id == "c1"
    assert not isinstance(request.tool_choice, dict)
