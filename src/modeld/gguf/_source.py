"""A bounded, buffered reader over an open file descriptor.

Every read is checked against the file size recorded at open, so a declared length can
never make the reader allocate or seek past the end: it raises :class:`ModelInvalid`
first. ``os.pread`` rather than ``mmap``: a file truncated under an mmap raises SIGBUS,
which would kill the process; a short ``pread`` is just an error.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterator

from modeld.errors import ModelInvalid

__all__ = ["ByteSource"]

_CHUNK_BYTES = 1 << 20
_U8 = struct.Struct("<B")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class ByteSource:
    """Sequential little-endian reads from ``fd``, never past ``size_bytes``."""

    def __init__(self, fd: int, size_bytes: int, path_label: str) -> None:
        self._fd = fd
        self.size_bytes = size_bytes
        self.position = 0
        self._label = path_label
        self._buffer = b""
        self._buffer_start = 0

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def remaining_bytes(self) -> int:
        return self.size_bytes - self.position

    def truncated(self, needed_bytes: int, what: str) -> ModelInvalid:
        return ModelInvalid(
            f"{self._label}: truncated: {what} needs {needed_bytes} bytes at offset "
            f"{self.position}, but the file has {self.size_bytes} bytes"
        )

    def _view(self, size_bytes: int, what: str) -> int:
        """Make ``[position, position + size_bytes)`` buffered; return its buffer index."""
        if size_bytes > self.remaining_bytes:
            raise self.truncated(size_bytes, what)
        start = self.position - self._buffer_start
        if start + size_bytes <= len(self._buffer) and start >= 0:
            return start
        want_bytes = min(max(size_bytes, _CHUNK_BYTES), self.remaining_bytes)
        try:
            data = os.pread(self._fd, want_bytes, self.position)
        except OSError as exc:
            raise ModelInvalid(f"{self._label}: read failed: {exc.strerror}") from exc
        if len(data) < size_bytes:
            raise ModelInvalid(f"{self._label}: the file shrank while it was being read")
        self._buffer = data
        self._buffer_start = self.position
        return 0

    def take(self, size_bytes: int, what: str) -> bytes:
        index = self._view(size_bytes, what)
        self.position += size_bytes
        return self._buffer[index : index + size_bytes]

    def unpack(self, layout: struct.Struct, what: str) -> tuple[object, ...]:
        index = self._view(layout.size, what)
        self.position += layout.size
        return layout.unpack_from(self._buffer, index)

    def u8(self, what: str) -> int:
        value: int = self.unpack(_U8, what)[0]  # type: ignore[assignment]
        return value

    def u32(self, what: str) -> int:
        value: int = self.unpack(_U32, what)[0]  # type: ignore[assignment]
        return value

    def u64(self, what: str) -> int:
        value: int = self.unpack(_U64, what)[0]  # type: ignore[assignment]
        return value

    def skip(self, size_bytes: int, what: str) -> None:
        if size_bytes > self.remaining_bytes:
            raise self.truncated(size_bytes, what)
        self.position += size_bytes

    def skip_strings(self, count: int, max_length_bytes: int, what: str) -> None:
        """Walk ``count`` length-prefixed strings without keeping any of them.

        The inner loop stays inside the buffer (a vocabulary is 10^5 strings); the
        outer step takes the checked slow path whenever a string crosses its end.
        """
        unpack_u64 = _U64.unpack_from
        index = 0
        while index < count:
            buffer = self._buffer
            end = len(buffer)
            cursor = self.position - self._buffer_start
            while index < count and cursor + 8 <= end:
                (length_bytes,) = unpack_u64(buffer, cursor)
                if length_bytes > max_length_bytes or cursor + 8 + length_bytes > end:
                    break
                cursor += 8 + length_bytes
                index += 1
            self.position = self._buffer_start + cursor
            if index == count:
                return
            length_bytes = self.u64(what)
            if length_bytes > max_length_bytes:
                raise ModelInvalid(
                    f"{self._label}: {what}[{index}] is {length_bytes} bytes long "
                    f"(limit {max_length_bytes})"
                )
            self.skip(length_bytes, f"{what}[{index}]")
            index += 1

    def strings(self, count: int, max_length_bytes: int, what: str) -> Iterator[bytes]:
        """Yield ``count`` length-prefixed strings from the current position, one at a
        time (memory stays one buffer, whatever ``count``); raises like :meth:`skip_strings`."""
        for index in range(count):
            length_bytes = self.u64(what)
            if length_bytes > max_length_bytes:
                raise ModelInvalid(
                    f"{self._label}: {what}[{index}] is {length_bytes} bytes long "
                    f"(limit {max_length_bytes})"
                )
            yield self.take(length_bytes, f"{what}[{index}]")

    def hash_strings(
        self, count: int, max_length_bytes: int, what: str, keep_lengths: frozenset[int]
    ) -> tuple[array[int], dict[int, bytes]]:
        """One pass over ``count`` length-prefixed strings: each one's ``hash()`` (an
        empty string hashed as llama.cpp renames it, ``[EMPTY_<index>]``), and the
        strings whose length is in ``keep_lengths``, by index. The hot loop of vocabulary
        validation (Gemma has 262,144 tokens), so it stays inside the buffer like
        :meth:`skip_strings`."""
        hashes: array[int] = array("q")
        append = hashes.append
        kept: dict[int, bytes] = {}
        unpack_u64 = _U64.unpack_from
        index = 0
        while index < count:
            buffer = self._buffer
            end = len(buffer)
            cursor = self.position - self._buffer_start
            while index < count and cursor >= 0 and cursor + 8 <= end:
                (length_bytes,) = unpack_u64(buffer, cursor)
                start = cursor + 8
                if length_bytes > max_length_bytes or start + length_bytes > end:
                    break
                cursor = start + length_bytes
                text = buffer[start:cursor]
                append(hash(text) if length_bytes else hash(b"[EMPTY_%d]" % index))
                if length_bytes in keep_lengths:
                    kept[index] = text
                index += 1
            self.position = self._buffer_start + cursor
            if index == count:
                break
            length_bytes = self.u64(what)
            if length_bytes > max_length_bytes:
                raise ModelInvalid(
                    f"{self._label}: {what}[{index}] is {length_bytes} bytes long "
                    f"(limit {max_length_bytes})"
                )
            text = self.take(length_bytes, f"{what}[{index}]")
            append(hash(text) if length_bytes else hash(b"[EMPTY_%d]" % index))
            if length_bytes in keep_lengths:
                kept[index] = text
            index += 1
        return hashes, kept

    def read_at(self, offset: int, size_bytes: int, what: str) -> bytes:
        """Read bytes that an earlier pass already bounds-checked."""
        if offset < 0 or offset + size_bytes > self.size_bytes:
            raise ModelInvalid(f"{self._label}: {what} lies outside the file")
        try:
            data = os.pread(self._fd, size_bytes, offset)
        except OSError as exc:
            raise ModelInvalid(f"{self._label}: read failed: {exc.strerror}") from exc
        if len(data) < size_bytes:
            raise ModelInvalid(f"{self._label}: the file shrank while it was being read")
        return data
