"""A stream line is one line for every reader: generated text holding U+2028, U+2029 or
U+0085 (which ``str.splitlines()``, and so httpx's ``iter_lines()``, treats as line ends)
is escaped, and the line still decodes to the same text."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from modeld.api.openai.framing import event
from modeld.api.streaming import ndjson_line

TRICKY = st.sampled_from(["\u2028", "\u2029", "\x85", "\n", "\r", "\x0b", "\x1c", "é", "🌊", "a"])


@given(text=st.one_of(st.text(), st.lists(TRICKY).map("".join)))
def test_a_line_is_one_line_and_round_trips(text: str) -> None:
    line = ndjson_line({"text": text, "tokens": 1})
    assert line.endswith(b"\n")
    decoded = line.decode()
    assert len(decoded.splitlines()) == 1
    assert json.loads(decoded) == {"text": text, "tokens": 1}


@given(text=st.one_of(st.text(), st.lists(TRICKY).map("".join)))
def test_an_sse_event_is_one_data_line_and_round_trips(text: str) -> None:
    """OpenAI's streams too (found by the soak: an httpx reader split chat chunks)."""
    data = {"choices": [{"delta": {"content": text}}]}
    lines = event(data).decode().splitlines()
    assert lines[1:] == [""]
    assert lines[0].startswith("data: ")
    assert json.loads(lines[0].removeprefix("data: ")) == data
