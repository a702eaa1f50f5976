"""Log probabilities in the protocols' shapes, from :class:`~modeld.types.TokenLogprob`.

OpenAI chat, ``/v1/responses`` and Ollama share one entry: ``{"token", "logprob",
"bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}`` (``token`` is the piece as
text: a piece that is part of a UTF-8 character reads as U+FFFD there, and ``bytes`` has
it exactly). Completions keep OpenAI's legacy shape: parallel lists ``tokens``,
``token_logprobs``, ``top_logprobs`` (one ``{token: logprob}`` per position) and
``text_offset`` (where each token starts in the answer's text, in characters, counted
across a stream's chunks).
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from modeld.types import TokenLogprob, TopLogprob

__all__ = ["LegacyLogprobs", "token_entries"]


def _top(top: TopLogprob) -> dict[str, object]:
    return {"token": top.text, "logprob": top.logprob, "bytes": list(top.piece)}


def token_entries(logprobs: Sequence[TokenLogprob]) -> list[dict[str, object]]:
    """OpenAI chat's ``logprobs.content`` (and Ollama's and Responses' ``logprobs``)."""
    return [{**_top(e), "top_logprobs": [_top(t) for t in e.top]} for e in logprobs]


class LegacyLogprobs:
    """Completions' ``logprobs`` objects for one answer, streamed or whole: each call
    continues the text offsets where the previous one ended."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._offset_chars = 0

    def shape(self, logprobs: Sequence[TokenLogprob]) -> dict[str, list[object]]:
        offsets: list[object] = []
        for entry in logprobs:
            offsets.append(self._offset_chars)
            self._offset_chars += len(self._decoder.decode(entry.piece))
        return {
            "tokens": [e.text for e in logprobs],
            "token_logprobs": [e.logprob for e in logprobs],
            "top_logprobs": [{t.text: t.logprob for t in e.top} for e in logprobs],
            "text_offset": offsets,
        }
