"""How long the event loop lets a generation's tokens gather before it takes them: a
window that adapts to the token rate, bounded by the longest gap its reader may see.

Each drain of the ring is one event-loop wake-up, one chunk framed and one socket write,
on a core a llama.cpp thread wants. A fixed window either holds one token at a time
(slow models: a wake per token, plus a timer wake for nothing) or holds tokens longer than
a reader needs. So the window is decided per stream from the rate it has seen:

* tokens that come at least twice per ``max_gap_s`` are held until ``max_gap_s`` after the
  previous chunk: one wake per window instead of one per token, and no chunk later than
  the reader's bound;
* slower tokens are taken as each one comes (holding them would only delay them);
* the first chunk, and the second (no rate is known yet), are never held;
* the end of the stream is never held either: :class:`~modeld.scheduling.generation.Generation`
  arms the ring so that only ``finish()`` wakes it during a hold.

A reader that takes the whole answer at once (``stream: false``, ``complete()``) sees no
gaps, so its bound is :data:`WHOLE_ANSWER_GAP_S`: small enough that a fast model cannot
fill the ring (64 KiB) in it, large enough that a 50 tok/s model wakes the loop a few
times a second.
"""

from __future__ import annotations

__all__ = ["WHOLE_ANSWER_GAP_S", "Coalescer"]

WHOLE_ANSWER_GAP_S = 0.25
_RATE_WEIGHT = 0.5  # of the newest interval in the running estimate
_MIN_TOKENS_PER_WINDOW = 2  # below this a hold only delays a token


class Coalescer:
    """The hold for one stream; fed by the chunks it sends, asked before each wait."""

    def __init__(self, max_gap_s: float) -> None:
        if max_gap_s < 0:
            raise ValueError("max_gap_s must not be negative")
        self._max_gap_s = max_gap_s
        self._last_chunk_s = 0.0
        self._seconds_per_token = 0.0  # 0: not known yet

    @property
    def max_gap_s(self) -> float:
        return self._max_gap_s

    @property
    def seconds_per_token(self) -> float:
        """The running estimate of the interval between tokens (0 until two chunks)."""
        return self._seconds_per_token

    def read_whole(self) -> None:
        """The reader takes the answer only at its end: hold for up to
        :data:`WHOLE_ANSWER_GAP_S` (never less than the bound it had)."""
        self._max_gap_s = max(self._max_gap_s, WHOLE_ANSWER_GAP_S)

    def chunk_sent(self, now_s: float, tokens: int) -> None:
        """A drain took ``tokens`` tokens at ``now_s`` (monotonic seconds)."""
        if self._last_chunk_s and tokens > 0:
            interval_s = (now_s - self._last_chunk_s) / tokens
            if self._seconds_per_token:
                interval_s += (1 - _RATE_WEIGHT) * (self._seconds_per_token - interval_s)
            self._seconds_per_token = interval_s
        self._last_chunk_s = now_s

    def hold_s(self, now_s: float) -> float:
        """How much longer to let tokens gather before taking them (0: take the next
        token as soon as it comes). Never past ``max_gap_s`` after the previous chunk."""
        per_token_s = self._seconds_per_token
        if not per_token_s or per_token_s * _MIN_TOKENS_PER_WINDOW > self._max_gap_s:
            return 0.0
        return max(0.0, self._last_chunk_s + self._max_gap_s - now_s)
