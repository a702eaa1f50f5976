"""Turn token pieces into safe-to-emit bytes: whole UTF-8 characters, nothing of a stop string.

The Python twin of the C loop's text handling; both follow the same rules (engine/base.py).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["TextAssembler", "utf8_incomplete_tail"]


def utf8_incomplete_tail(data: bytes | bytearray) -> int:
    """Length of a trailing, still-valid but unfinished UTF-8 sequence (0 to 3 bytes)."""
    n = len(data)
    for back in range(1, min(4, n) + 1):
        byte = data[n - back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead
            continue
        if byte & 0x80 == 0:
            return 0
        if byte & 0xE0 == 0xC0:
            need = 2
        elif byte & 0xF0 == 0xE0:
            need = 3
        elif byte & 0xF8 == 0xF0:
            need = 4
        else:
            return 0  # not a lead byte: invalid, emit as is
        return back if back < need else 0
    return 0


def _stop_prefix_hold(data: bytearray, stops: Sequence[bytes]) -> int:
    """Longest suffix of ``data`` that is a proper prefix of some stop string."""
    best = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(data)), best, -1):
            if data.endswith(stop[:k]):
                best = k
                break
    return best


class TextAssembler:
    """Accumulates token pieces and releases only bytes that can no longer change."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [s.encode("utf-8") for s in stops if s]
        self._pending = bytearray()
        self.stopped = False

    def feed(self, piece: bytes) -> bytes:
        """Add one token's piece; return the bytes now safe to emit.

        Sets ``stopped`` when a stop string completed; the returned bytes then end just
        before it, and nothing more will ever be released.
        """
        if self.stopped:
            return b""
        self._pending += piece
        if self._stops:
            cut = min(
                (i for i in (self._pending.find(s) for s in self._stops) if i >= 0),
                default=-1,
            )
            if cut >= 0:
                self.stopped = True
                out = bytes(self._pending[:cut])
                self._pending.clear()
                return out
        hold = max(
            _stop_prefix_hold(self._pending, self._stops), utf8_incomplete_tail(self._pending)
        )
        release = len(self._pending) - hold
        out = bytes(self._pending[:release])
        del self._pending[:release]
        return out

    def flush(self) -> bytes:
        """The held-back tail, at the end of a generation that did not hit a stop string."""
        out = b"" if self.stopped else bytes(self._pending)
        self._pending.clear()
        return out
