"""A token's log probabilities packed into one ``bytes``: what goes in comes out (32-bit
floats exactly, pieces byte for byte, the alternatives in order), and an entry with 20
alternatives stays a few hundred bytes, where the objects it replaced took ~3.5 KB."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest

from modeld.types import MAX_TOP_LOGPROBS, TokenLogprob, TopLogprob


def _f32(value: float) -> float:
    return float(np.float32(value))


def test_what_is_packed_reads_back() -> None:
    top = [(7, b"\xe2\x82", _f32(-0.25)), (262_143, b"", _f32(-1.5)), (3, b"abc", _f32(-9.75))]
    entry = TokenLogprob.of(262_143, b"\xe2\x82\xac!", _f32(-0.1), top)
    assert (entry.id, entry.piece, entry.logprob) == (262_143, b"\xe2\x82\xac!", _f32(-0.1))
    assert entry.text == "€!"
    assert entry.alternatives() == top
    assert entry.top == tuple(TopLogprob(*t) for t in top)
    assert entry.top[0].text == "\ufffd"


def test_no_alternatives_and_the_longest_pieces() -> None:
    bare = TokenLogprob.of(0, b"", 0.0)
    assert (bare.id, bare.piece, bare.logprob, bare.top) == (0, b"", 0.0, ())
    long_piece = bytes(range(256)) * 4
    top = [(i, bytes([i]) * 256, _f32(-i / 3)) for i in range(MAX_TOP_LOGPROBS)]
    entry = TokenLogprob.of(5, long_piece, _f32(-2 / 3), top)
    assert entry.piece == long_piece
    assert entry.alternatives() == top


def test_a_value_that_does_not_fit_is_refused_not_cut() -> None:
    with pytest.raises(struct.error):
        TokenLogprob.of(1, b"a", -1.0, [(1, b"a", -1.0)] * 256)
    with pytest.raises(struct.error):
        TokenLogprob.of(1, b"a", -1.0, [(1, b"a" * 65_536, -1.0)])


def test_an_entry_of_twenty_alternatives_takes_a_few_hundred_bytes() -> None:
    top = [(100_000 + i, b"tok" + bytes([65 + i]), _f32(-i / 7)) for i in range(20)]
    entry = TokenLogprob.of(100_000, b"tokA", _f32(-0.5), top)
    size_bytes = sys.getsizeof(entry) + sys.getsizeof(entry.packed)
    assert size_bytes < 400, size_bytes  # one struct and one bytes: nothing else is held
