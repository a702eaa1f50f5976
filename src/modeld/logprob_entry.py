"""A generated token's log probabilities, packed into one ``bytes``.

A whole answer keeps every token's entry until it is written: ``n`` choices of
``max_tokens`` tokens with 20 alternatives each. As Python objects (a struct, an int, a
float and a ``bytes`` per alternative) an entry took about 3.5 KB; packed it is one
small struct holding one ``bytes`` of about 14 bytes per alternative (the bound on what
a request may keep is :data:`~modeld.types.MAX_LOGPROB_VALUES`, sized by these bytes).

Layout, little-endian: the token's id (int32), log probability (float32), piece length
(uint32) and number of alternatives ``n`` (uint8); the alternatives' ids (``n`` int32),
log probabilities (``n`` float32) and piece lengths (``n`` uint16); then the token's
piece and the alternatives' pieces. Both token loops report 32-bit floats, so packing
loses nothing. :attr:`TokenLogprob.top` unpacks the alternatives as
:class:`TopLogprob` s; :meth:`TokenLogprob.alternatives` as plain tuples (what the
protocols' shaping reads).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterable

import msgspec

__all__ = ["RawTop", "TokenLogprob", "TopLogprob"]

RawTop = tuple[int, bytes, float]
"""An alternative as ``(id, piece, logprob)``."""

_HEAD = struct.Struct("<ifIB")


@functools.cache
def _table(n: int) -> struct.Struct:
    """The alternatives' ids, log probabilities and piece lengths, grouped by field."""
    return struct.Struct(f"<{n}i{n}f{n}H")


class TopLogprob(msgspec.Struct, frozen=True, array_like=True):
    """One of the likeliest tokens at a position: its id, its piece (raw bytes, maybe
    part of a UTF-8 character) and its log probability."""

    id: int
    piece: bytes
    logprob: float

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", "replace")


class TokenLogprob(msgspec.Struct, frozen=True, gc=False):
    """A generated token's log probability and the likeliest tokens at its position,
    most likely first; built with :meth:`of`, read through its properties."""

    packed: bytes

    @classmethod
    def of(
        cls, token_id: int, piece: bytes, logprob: float, top: Iterable[RawTop] = ()
    ) -> TokenLogprob:
        """Raises :class:`struct.error` for more than 255 alternatives or an
        alternative's piece over 65,535 bytes (the loops report at most 20, of at most
        256 bytes)."""
        alternatives = tuple(top)
        n = len(alternatives)
        head = _HEAD.pack(token_id, logprob, len(piece), n)
        if not n:
            return cls(head + piece)
        ids, pieces, values = zip(*alternatives, strict=True)
        table = _table(n).pack(*ids, *values, *(len(p) for p in pieces))
        return cls(b"".join((head, table, piece, *pieces)))

    @property
    def id(self) -> int:
        token_id: int = _HEAD.unpack_from(self.packed)[0]
        return token_id

    @property
    def logprob(self) -> float:
        value: float = _HEAD.unpack_from(self.packed)[1]
        return value

    @property
    def piece(self) -> bytes:
        _, _, length, n = _HEAD.unpack_from(self.packed)
        start = _HEAD.size + _table(n).size
        return self.packed[start : start + length]

    @property
    def text(self) -> str:
        return self.piece.decode("utf-8", "replace")

    def alternatives(self) -> list[RawTop]:
        """The likeliest tokens as ``(id, piece, logprob)``, most likely first."""
        packed = self.packed
        _, _, length, n = _HEAD.unpack_from(packed)
        if not n:
            return []
        table = _table(n)
        fields = table.unpack_from(packed, _HEAD.size)
        at = _HEAD.size + table.size + length
        out = []
        ids, values, sizes = fields[:n], fields[n : 2 * n], fields[2 * n :]
        for token_id, value, size in zip(ids, values, sizes, strict=True):
            out.append((token_id, packed[at : at + size], value))
            at += size
        return out

    @property
    def top(self) -> tuple[TopLogprob, ...]:
        return tuple(TopLogprob(*alternative) for alternative in self.alternatives())
