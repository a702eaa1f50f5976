"""The C loop's text rules are exactly textstream.TextAssembler's (differential tests)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modeld.engine.textstream import TextAssembler
from modeld.types import LoopKind


@pytest.fixture(scope="module")
def c_assembler_type() -> Any:
    from modeld.engine.select import token_loop

    loop = token_loop(LoopKind.C)
    return loop._ext.TextAssembler  # type: ignore[attr-defined]


# Bytes biased towards UTF-8 structure: ASCII, continuation and lead bytes of every length.
_byte = st.sampled_from([0x41, 0x61, 0x20, 0x80, 0xA9, 0xBF, 0xC3, 0xE6, 0xF0, 0x9F, 0xFF])
_piece = st.lists(_byte, max_size=6).map(bytes)
_stop = st.text(alphabet="aA é日🌊", min_size=1, max_size=4)


def _run(assembler: Any, pieces: list[bytes]) -> tuple[list[bytes], bytes, bool]:
    out = [assembler.feed(p) for p in pieces]
    return out, assembler.flush(), bool(assembler.stopped)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_piece, max_size=30), stops=st.lists(_stop, max_size=3))
def test_random_pieces(c_assembler_type: Any, pieces: list[bytes], stops: list[str]) -> None:
    assert _run(c_assembler_type(stops), pieces) == _run(TextAssembler(stops), pieces)


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet="aA é日🌊\n", max_size=40), data=st.data())
def test_stop_strings_taken_from_the_text(c_assembler_type: Any, text: str, data: Any) -> None:
    encoded = text.encode()
    cuts = sorted(data.draw(st.lists(st.integers(0, len(encoded)), max_size=8)))
    pieces = [encoded[a:b] for a, b in zip([0, *cuts], [*cuts, len(encoded)], strict=True)]
    start = data.draw(st.integers(0, max(0, len(text) - 1)))
    stops = [text[start : start + data.draw(st.integers(1, 5))] or "a"]
    assert _run(c_assembler_type(stops), pieces) == _run(TextAssembler(stops), pieces)


@pytest.mark.parametrize(
    ("pieces", "stops", "expected"),
    [
        ([b"\xe6", b"\x97", b"\xa5"], [], [b"", b"", "日".encode()]),
        ([b"ab", b"cd"], ["bc"], [b"a", b""]),
        ([b"a\xf0\x9f", b"\x8c\x8a!"], ["!"], [b"a", "🌊".encode()]),
        ([b"\xe6\x97", b"A"], [], [b"", b"\xe6\x97A"]),  # never completes: sent as is
        ([b"xSTO", b"P tail"], ["STOP"], [b"x", b""]),
    ],
)
def test_known_cases(
    c_assembler_type: Any, pieces: list[bytes], stops: list[str], expected: list[bytes]
) -> None:
    assembler = c_assembler_type(stops)
    assert [assembler.feed(p) for p in pieces] == expected


def test_stop_strings_may_be_bytes_and_empty_ones_are_ignored(c_assembler_type: Any) -> None:
    assembler = c_assembler_type([b"", b"\xff"])
    assert assembler.feed(b"ok\xffnot this") == b"ok"
    assert assembler.stopped
    assert assembler.feed(b"more") == b""
    assert assembler.flush() == b""


def test_bad_stop_type_is_refused(c_assembler_type: Any) -> None:
    with pytest.raises(TypeError, match="str or bytes"):
        c_assembler_type([1])
