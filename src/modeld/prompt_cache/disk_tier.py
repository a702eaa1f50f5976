"""The prompt cache's disk tier: sequence states that outlive the process.

One file per entry, ``<namespace digest>-<tokens digest>.pc``, written to a temporary
name (mode 0600) and renamed into place, laid out as::

    MAGIC (10 bytes) | header length (u32 LE) | header (JSON) | tokens (i32 LE) | payload

The header names the whole :class:`Namespace` (model id and file identity, context
parameters, llama.cpp build), the token count, the payload size and a blake2b-256 of
tokens + payload. A file is handed on only when every field equals what the caller
expects, its size is exactly what the header says and the checksum matches; anything
else (truncated, bit-flipped, another model's, another build's, not ours at all) is
removed and reported as a miss. Nothing read from a file reaches llama.cpp before that.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
import time
import uuid
from array import array
from dataclasses import dataclass
from pathlib import Path

import orjson
from loguru import logger

from modeld.prompt_cache.namespace import Namespace, llama_build

__all__ = ["DiskEntry", "DiskTier", "tokens_digest"]

MAGIC = b"MODELD-PC\x01"
MAX_HEADER_BYTES = 64 * 1024
_PREFIX = struct.Struct("<10sI")
_SUFFIX = ".pc"
_STALE_TMP_S = 3600.0


def tokens_digest(tokens: tuple[int, ...]) -> str:
    return hashlib.blake2b(_token_bytes(tokens), digest_size=16).hexdigest()


def _token_bytes(tokens: tuple[int, ...]) -> bytes:
    return array("i", tokens).tobytes()


def _checksum(token_bytes: bytes, payload: bytes) -> str:
    digest = hashlib.blake2b(digest_size=32)
    digest.update(token_bytes)
    digest.update(payload)
    return digest.hexdigest()


@dataclass(frozen=True, slots=True)
class DiskEntry:
    path: Path
    namespace_digest: str
    tokens: tuple[int, ...]
    file_bytes: int


@dataclass(frozen=True, slots=True)
class _Header:
    namespace: dict[str, object]
    payload_bytes: int
    blake2b: str


class _Invalid(Exception):
    """The file is not an entry this process may use."""


class DiskTier:
    """The directory's entries, indexed by namespace; thread-safe (workers save and load).

    ``bound_bytes`` caps the files' total size: the least recently used go first.
    """

    def __init__(self, directory: Path, bound_bytes: int) -> None:
        self.directory = directory
        self.bound_bytes = bound_bytes
        self._lock = threading.Lock()
        self._entries: dict[Path, DiskEntry] = {}
        self._used_at: dict[Path, float] = {}
        self.removed_invalid = 0
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._scan()

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return sum(entry.file_bytes for entry in self._entries.values())

    @property
    def count(self) -> int:
        return len(self._entries)

    def entries(self, namespace_digest: str) -> list[DiskEntry]:
        with self._lock:
            return [e for e in self._entries.values() if e.namespace_digest == namespace_digest]

    def _scan(self) -> None:
        """Index what a previous process left; remove what no process of this build can
        use (unreadable, another build, temporaries a crash left behind)."""
        build = llama_build()
        now = time.time()
        for path in sorted(self.directory.iterdir()):
            if path.name.startswith("."):
                if path.name.endswith(".tmp") and _age_s(path, now) > _STALE_TMP_S:
                    self._unlink(path)
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                header, tokens, size_bytes = _read_header(path, None)
                if header.namespace.get("build") != build:
                    raise _Invalid("written by another llama.cpp build")
                digest = Namespace(**header.namespace).digest()  # type: ignore[arg-type]
                if not path.name.startswith(digest + "-"):
                    raise _Invalid("its name and its header disagree")
            except (_Invalid, OSError, TypeError, ValueError) as exc:
                self._discard(path, str(exc))
                continue
            self._entries[path] = DiskEntry(path, digest, tokens, size_bytes)
            self._used_at[path] = _mtime(path)
        self._trim(0)

    def load(self, entry: DiskEntry, namespace: Namespace, max_payload_bytes: int) -> bytes | None:
        """The entry's payload once every check passes; None (and the file removed) when
        any fails."""
        try:
            header, tokens, _ = _read_header(entry.path, namespace)
            if tokens != entry.tokens:
                raise _Invalid("its tokens changed since it was indexed")
            payload_bytes = header.payload_bytes
            if payload_bytes > max_payload_bytes:
                raise _Invalid("its payload is larger than any state this context makes")
            with entry.path.open("rb") as handle:
                handle.seek(-payload_bytes, os.SEEK_END)
                payload = handle.read(payload_bytes + 1)
            if len(payload) != payload_bytes:
                raise _Invalid("truncated")
            if _checksum(_token_bytes(tokens), payload) != header.blake2b:
                raise _Invalid("checksum mismatch")
        except (_Invalid, OSError, KeyError, TypeError, ValueError) as exc:
            self.drop(entry)
            self._discard(entry.path, str(exc))
            return None
        with self._lock:
            self._used_at[entry.path] = time.time()
        return payload

    def save(self, namespace: Namespace, tokens: tuple[int, ...], payload: bytes) -> bool:
        """Write an entry atomically (mode 0600); False when it cannot fit the bound or
        the write fails (logged, never raised: the cache is an optimisation)."""
        token_bytes = _token_bytes(tokens)
        header = orjson.dumps(
            {
                "namespace": namespace.as_dict(),
                "n_tokens": len(tokens),
                "payload_bytes": len(payload),
                "blake2b": _checksum(token_bytes, payload),
            }
        )
        file_bytes = _PREFIX.size + len(header) + len(token_bytes) + len(payload)
        if file_bytes > self.bound_bytes:
            return False
        self._trim(file_bytes)
        path = self.directory / f"{namespace.digest()}-{tokens_digest(tokens)}{_SUFFIX}"
        staging = self.directory / f".{uuid.uuid4().hex}.tmp"
        try:
            fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                for part in (_PREFIX.pack(MAGIC, len(header)), header, token_bytes, payload):
                    _write_all(fd, part)
            finally:
                os.close(fd)
            os.replace(staging, path)
        except OSError as exc:
            logger.warning("prompt cache: cannot write an entry", error=exc.strerror)
            self._unlink(staging)
            return False
        with self._lock:
            self._entries[path] = DiskEntry(path, namespace.digest(), tokens, file_bytes)
            self._used_at[path] = time.time()
        return True

    def drop(self, entry: DiskEntry) -> None:
        with self._lock:
            self._entries.pop(entry.path, None)
            self._used_at.pop(entry.path, None)
        self._unlink(entry.path)

    def _trim(self, need_bytes: int) -> None:
        """Remove least recently used entries until ``need_bytes`` more fit the bound."""
        with self._lock:
            order = sorted(self._entries, key=lambda p: self._used_at.get(p, 0.0))
            total = sum(entry.file_bytes for entry in self._entries.values())
            doomed: list[Path] = []
            for path in order:
                if total + need_bytes <= self.bound_bytes:
                    break
                total -= self._entries.pop(path).file_bytes
                self._used_at.pop(path, None)
                doomed.append(path)
        for path in doomed:
            self._unlink(path)

    def _discard(self, path: Path, why: str) -> None:
        self.removed_invalid += 1
        logger.warning("prompt cache: removed an unusable entry", file=path.name, why=why)
        self._unlink(path)

    @staticmethod
    def _unlink(path: Path) -> None:
        with contextlib.suppress(OSError):
            path.unlink()


def _read_header(path: Path, expected: Namespace | None) -> tuple[_Header, tuple[int, ...], int]:
    """The header and tokens, checked for shape and (given ``expected``) for every
    namespace field, and the file's size checked against them. Never reads a payload."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        magic, header_bytes = _PREFIX.unpack(_exactly(handle.read(_PREFIX.size), _PREFIX.size))
        if magic != MAGIC:
            raise _Invalid("not a modeld prompt cache entry")
        if header_bytes > MAX_HEADER_BYTES:
            raise _Invalid("header too large")
        header = orjson.loads(_exactly(handle.read(header_bytes), header_bytes))
        if not isinstance(header, dict) or not isinstance(header.get("namespace"), dict):
            raise _Invalid("malformed header")
        if expected is not None and header["namespace"] != expected.as_dict():
            raise _Invalid("written for another model or context")
        n_tokens, payload_bytes = header.get("n_tokens"), header.get("payload_bytes")
        if not isinstance(n_tokens, int) or not isinstance(payload_bytes, int):
            raise _Invalid("malformed header")
        n_ctx = header["namespace"].get("n_ctx")
        if not isinstance(n_ctx, int) or not 0 < n_tokens <= n_ctx or payload_bytes <= 0:
            raise _Invalid("token count or payload size out of range")
        checksum = header.get("blake2b")
        if not isinstance(checksum, str):
            raise _Invalid("malformed header")
        if info.st_size != _PREFIX.size + header_bytes + 4 * n_tokens + payload_bytes:
            raise _Invalid("its size is not what its header says (truncated or padded)")
        raw = array("i")
        raw.frombytes(_exactly(handle.read(4 * n_tokens), 4 * n_tokens))
    return _Header(header["namespace"], payload_bytes, checksum), tuple(raw), int(info.st_size)


def _exactly(data: bytes, size: int) -> bytes:
    if len(data) != size:
        raise _Invalid("truncated")
    return data


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _age_s(path: Path, now: float) -> float:
    return now - _mtime(path)
