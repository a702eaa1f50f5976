"""Each token's log probabilities go out exactly once, with the chunk that completes its
text: the loop's own text assembler decides what is released (held-back UTF-8, stop
prefixes, a stop cut), a real ring carries it, and the aligner pairs the two."""

from __future__ import annotations

import pytest

from modeld.engine.pyring import PyTokenRing
from modeld.engine.textstream import TextAssembler
from modeld.scheduling.logprob_align import LogprobAligner


def _chunks(pieces: list[bytes], stops: list[str], *, flush: bool = True) -> list[list[bytes]]:
    """What a consumer draining after every token sees: per chunk, the pieces of the
    entries it carries (the last chunk is the end of the stream)."""
    ring = PyTokenRing(1024)
    aligner = LogprobAligner(ring)
    text = TextAssembler(stops)
    out = []
    for token, piece in enumerate(pieces):
        ring.push_logprob((token, piece, -1.0, ()))
        ring.push(text.feed(piece), 1)
        data, _, _ = ring.drain()
        out.append([e.piece for e in aligner.take(len(data))])
        if text.stopped:
            break
    tail = text.flush() if flush else b""
    out.append([e.piece for e in aligner.take(len(tail), final=True)])
    ring.close()
    return out


def test_a_split_character_brings_both_tokens_with_it() -> None:
    assert _chunks([b"a", b"\xe2\x82", b"\xac", b"!"], []) == [
        [b"a"], [], [b"\xe2\x82", b"\xac"], [b"!"], [],
    ]  # fmt: skip


def test_a_stop_string_keeps_the_token_it_cuts_and_drops_the_ones_inside_it() -> None:
    # "ab" | "cd" (holds "d", a prefix of "de") | "ef" completes "de": released "abc"
    assert _chunks([b"ab", b"cd", b"ef", b"gh"], ["de"]) == [[b"ab"], [], [], [b"cd"]]


def test_a_stop_string_on_a_token_boundary_reports_nothing_of_it() -> None:
    assert _chunks([b"ab", b"de", b"f"], ["de"]) == [[b"ab"], [], []]


def test_held_text_at_the_end_of_the_context_goes_out_with_its_tokens() -> None:
    # "d" is held as a prefix of "de" until the generation ends and flushes it
    assert _chunks([b"ab", b"cd"], ["de"]) == [[b"ab"], [], [b"cd"]]


@pytest.mark.parametrize(
    ("pieces", "sent"),
    [([b"ab", b"\xe2\x82"], [b"ab"]),
     ([b"a", b"", b"\xe2\x82"], [b"a", b""])],  # an empty piece counts where it stands
)  # fmt: skip
def test_a_cancelled_stream_reports_only_what_was_sent(
    pieces: list[bytes], sent: list[bytes]
) -> None:
    chunks = _chunks(pieces, [], flush=False)
    assert [p for chunk in chunks for p in chunk] == sent
