"""Log probabilities in the protocols' shapes, from :class:`~modeld.types.TokenLogprob`.

OpenAI chat, ``/v1/responses`` and Ollama share one entry: ``{"token", "logprob",
"bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}`` (``token`` is the piece as
text: a piece that is part of a UTF-8 character reads as U+FFFD there, and ``bytes`` has
it exactly). Completions keep OpenAI's legacy shape: parallel lists ``tokens``,
``token_logprobs``, ``top_logprobs`` (one ``{token: logprob}`` per position) and
``text_offset`` (where each token starts in the answer's text, in characters, counted
across a stream's chunks).

Both come back as JSON already encoded (an :class:`orjson.Fragment`, which ``orjson``
writes as it is): a whole answer of several choices with 20 alternatives a token would
otherwise build a dict per alternative for every token of every choice before the first
byte is written. Encoded entry by entry, only one entry's objects exist at a time.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

import orjson

from modeld.types import TokenLogprob

__all__ = ["LegacyLogprobs", "token_entries"]


def _top(piece: bytes, logprob: float) -> dict[str, object]:
    return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}


def _entry(entry: TokenLogprob) -> bytes:
    shaped = _top(entry.piece, entry.logprob)
    shaped["top_logprobs"] = [_top(piece, value) for _, piece, value in entry.alternatives()]
    return orjson.dumps(shaped)


def token_entries(logprobs: Sequence[TokenLogprob]) -> orjson.Fragment:
    """OpenAI chat's ``logprobs.content`` (and Ollama's and Responses' ``logprobs``)."""
    return orjson.Fragment(b"[" + b",".join([_entry(e) for e in logprobs]) + b"]")


class LegacyLogprobs:
    """Completions' ``logprobs`` objects for one answer, streamed or whole: each call
    continues the text offsets where the previous one ended."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._offset_chars = 0

    def shape(self, logprobs: Sequence[TokenLogprob]) -> orjson.Fragment:
        offsets: list[int] = []
        tokens: list[str] = []
        for entry in logprobs:
            offsets.append(self._offset_chars)
            piece = entry.piece
            tokens.append(piece.decode("utf-8", "replace"))
            self._offset_chars += len(self._decoder.decode(piece))
        tops = [
            orjson.dumps({p.decode("utf-8", "replace"): v for _, p, v in e.alternatives()})
            for e in logprobs
        ]
        shaped = {
            "tokens": tokens,
            "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": orjson.Fragment(b"[" + b",".join(tops) + b"]"),
            "text_offset": offsets,
        }
        return orjson.Fragment(orjson.dumps(shaped))
