"""Each format's streaming parser on canned model output: content and calls come out the
same however the stream is cut, calls never leak into content, and a would-be call that
does not parse comes back as content."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.tools import ContentDelta, ToolCallDelta, ToolCallParser, ToolFormat


def _ids() -> itertools.count[int]:
    return itertools.count()


def run(fmt: ToolFormat, chunks: list[str]) -> tuple[str, list[tuple[str, dict[str, object]]]]:
    """(content, [(name, arguments)]) from ``chunks``, checking the delta order: a call's
    id and name come before its arguments, indices count up from 0."""
    counter = itertools.count()
    parser = ToolCallParser(fmt, new_id=lambda: f"call_{next(counter)}")
    deltas = [d for chunk in chunks for d in parser.feed(chunk)] + parser.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls: list[tuple[str, dict[str, object]]] = []
    named: dict[int, str] = {}
    for delta in deltas:
        if isinstance(delta, ToolCallDelta) and delta.name is not None:
            assert delta.index == len(named)
            assert delta.id == f"call_{delta.index}"
            named[delta.index] = delta.name
        elif isinstance(delta, ToolCallDelta):
            assert delta.index in named
            calls.append((named[delta.index], json.loads(delta.arguments)))
    return content, calls


WEATHER = ("get_weather", {"city": "Paris"})
TIME = ("get_time", {"zone": "UTC", "precise": True})
CASES = {
    "hermes-one": (
        ToolFormat.HERMES,
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        "</tool_call>",
        "Let me check.", [WEATHER],
    ),
    "hermes-two": (
        ToolFormat.HERMES,
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC", "precise": true}}'
        "</tool_call>",
        "\n", [WEATHER, TIME],
    ),
    "hermes-unclosed-at-end": (
        ToolFormat.HERMES,
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "", [WEATHER],
    ),
    "hermes-broken": (
        ToolFormat.HERMES,
        "a <tool_call>{not json</tool_call> b",
        "a <tool_call>{not json</tool_call> b", [],
    ),
    "hermes-text-with-angle": (
        ToolFormat.HERMES, "1 < 2 and <tool is not a call", "1 < 2 and <tool is not a call", [],
    ),
    "llama3-call": (
        ToolFormat.LLAMA3,
        ' {"name": "get_weather", "parameters": {"city": "Paris"}}',
        "", [WEATHER],
    ),
    "llama3-python-tag": (
        ToolFormat.LLAMA3,
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}',
        "", [WEATHER],
    ),
    "llama3-text": (ToolFormat.LLAMA3, 'It is {"sunny"} today.', 'It is {"sunny"} today.', []),
    "llama3-broken": (
        ToolFormat.LLAMA3, '{"name": "get_weather", "para', '{"name": "get_weather", "para', [],
    ),
    "mistral-calls": (
        ToolFormat.MISTRAL,
        'Sure.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": {"zone": "UTC", "precise": true}}]',
        "Sure.", [WEATHER, TIME],
    ),
    "mistral-special-token-unseen": (
        ToolFormat.MISTRAL,
        '[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        "", [WEATHER],
    ),
    "mistral-broken": (
        ToolFormat.MISTRAL, "x[TOOL_CALLS][{oops", "x[TOOL_CALLS][{oops", [],
    ),
    "generic-calls": (
        ToolFormat.GENERIC,
        '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}',
        "", [WEATHER],
    ),
    "generic-content": (ToolFormat.GENERIC, '{"content": "Hello there"}', "Hello there", []),
    "generic-text": (ToolFormat.GENERIC, "Plain words.", "Plain words.", []),
    "generic-broken": (ToolFormat.GENERIC, '{"tool_calls": [', '{"tool_calls": [', []),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_whole_output(case: str) -> None:
    fmt, text, content, calls = CASES[case]
    assert run(fmt, [text]) == (content, calls)


@pytest.mark.parametrize("case", list(CASES))
def test_every_split_into_two_chunks(case: str) -> None:
    fmt, text, content, calls = CASES[case]
    for at in range(len(text) + 1):
        assert run(fmt, [text[:at], text[at:]]) == (content, calls), at


@pytest.mark.parametrize("case", list(CASES))
def test_one_character_at_a_time(case: str) -> None:
    fmt, text, content, calls = CASES[case]
    assert run(fmt, list(text)) == (content, calls)


@settings(max_examples=60, deadline=None)
@given(case=st.sampled_from(list(CASES)), data=st.data())
def test_any_chunking(case: str, data: st.DataObject) -> None:
    fmt, text, content, calls = CASES[case]
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=12)))
    bounds = [0, *cuts, len(text)]
    chunks = [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert run(fmt, chunks) == (content, calls)


def test_content_streams_before_the_end() -> None:
    """Free text is not held back beyond what could still open a call."""
    parser = ToolCallParser(ToolFormat.HERMES)
    assert parser.feed("Hello wor") == [ContentDelta("Hello wor")]
    assert parser.feed("ld <tool") == [ContentDelta("ld ")]
    assert parser.feed("box>") == [ContentDelta("<toolbox>")]
