"""The state directory itself: created private (0700), small JSON files written whole.

Every write goes to a temporary name and is renamed into place, so a reader (or a
process that died half-way) never sees half a file. Reads are bounded: a file that is
too large or not JSON is treated as absent, never trusted.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import orjson

from modeld.errors import ConfigError

__all__ = ["MAX_RECORD_BYTES", "StateDir"]

MAX_RECORD_BYTES = 64 * 1024


class StateDir:
    """One subdirectory per kind of record (``verdicts``, ``markers``)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def sub(self, name: str) -> Path:
        """The subdirectory ``name``, created (0700) if missing.

        Raises :class:`ConfigError` when it cannot be created or written.
        """
        path = self.root / name
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"state dir {name}: cannot create it: {exc.strerror}") from exc
        return path

    def write(self, directory: Path, name: str, record: Mapping[str, object]) -> Path:
        """Write ``record`` as ``directory/name`` atomically (temp file, then rename)."""
        target = directory / name
        staging = directory / f".{uuid.uuid4().hex}.tmp"
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            write_all(fd, orjson.dumps(record))
        finally:
            os.close(fd)
        os.replace(staging, target)
        return target

    @staticmethod
    def read(path: Path) -> dict[str, object] | None:
        """The record at ``path``; None when missing, oversized or not a JSON object."""
        try:
            with path.open("rb") as handle:
                data = handle.read(MAX_RECORD_BYTES + 1)
        except OSError:
            return None
        if len(data) > MAX_RECORD_BYTES:
            return None
        try:
            record = orjson.loads(data)
        except orjson.JSONDecodeError:
            return None
        return record if isinstance(record, dict) else None

    @staticmethod
    def records(directory: Path) -> Iterator[Path]:
        """The record files in ``directory`` (temporary ones skipped), sorted by name."""
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            return
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                yield directory / name


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data) :]
