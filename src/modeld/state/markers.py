"""Stage markers: "this process is handing this file to llama.cpp, at this stage".

Before modeld runs llama.cpp in-process on a file (the load, the warm-up, the first
generation of an instance), it writes a marker and holds an ``flock`` on it; when the
stage ends, however it ends in Python, the marker is removed. Only a process that dies
inside the stage (a native abort, a segfault, SIGKILL) leaves one behind, and its lock
goes with it. So at start-up :meth:`StageMarkers.recover` takes every marker whose lock
it can take: each is a crash, with the model and the stage. Markers of live processes
(another modeld sharing the state dir, mid-load) stay locked and are left alone.

A marker is written under a temporary name, locked, then renamed into place, so a
scanner never sees an unlocked live marker. A marker costs a few system calls and no
fsync: it has to survive the process, not the machine.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson

from modeld.gguf import FileIdentity
from modeld.state.directory import MAX_RECORD_BYTES, StateDir, write_all

__all__ = ["CrashRecord", "StageMarker", "StageMarkers"]


@dataclass(frozen=True, slots=True)
class CrashRecord:
    """A stage a previous process did not come back from."""

    model_id: str
    identity: FileIdentity
    stage: str
    pid: int
    started_unix: float


class StageMarker:
    """One held marker; :meth:`end` is idempotent and may run on any thread."""

    def __init__(self, path: Path, fd: int) -> None:
        self._path: Path | None = path
        self._fd = fd

    def end(self) -> None:
        if self._path is None:
            return
        path, self._path = self._path, None
        path.unlink(missing_ok=True)  # while still locked: no scanner can take it
        os.close(self._fd)


class StageMarkers:
    """The ``markers/`` directory. Blocking file I/O: call it off the event loop."""

    def __init__(self, state: StateDir) -> None:
        self._state = state

    def begin(self, model_id: str, identity: FileIdentity, stage: str) -> StageMarker:
        directory = self._state.sub("markers")
        name = uuid.uuid4().hex
        staging = directory / f".{name}.tmp"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            record = {
                "model": model_id,
                "identity": [
                    identity.device,
                    identity.inode,
                    identity.size_bytes,
                    identity.mtime_ns,
                ],
                "stage": stage,
                "pid": os.getpid(),
                "started_unix": time.time(),
            }
            write_all(fd, orjson.dumps(record))
            final = directory / f"{name}.json"
            os.replace(staging, final)
        except BaseException:
            os.close(fd)
            staging.unlink(missing_ok=True)
            raise
        return StageMarker(final, fd)

    def recover(self) -> list[CrashRecord]:
        """Claim the markers left by processes that died inside a stage (and remove
        them); a marker still locked by a live process is skipped."""
        directory = self._state.sub("markers")
        crashes = []
        for path in self._state.records(directory):
            record = _claim(path)
            if record is not None:
                crashes.append(record)
        return sorted(crashes, key=lambda crash: crash.started_unix)


def _claim(path: Path) -> CrashRecord | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # ended or claimed meanwhile
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None  # its process is alive
            raise
        if os.fstat(fd).st_nlink == 0:
            return None  # another process claimed it first
        data = os.read(fd, MAX_RECORD_BYTES)
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)
    return _parse(data)


def _parse(data: bytes) -> CrashRecord | None:
    try:
        record = orjson.loads(data)
        device, inode, size_bytes, mtime_ns = record["identity"]
        return CrashRecord(
            model_id=str(record["model"]),
            identity=FileIdentity(int(device), int(inode), int(size_bytes), int(mtime_ns)),
            stage=str(record["stage"]),
            pid=int(record["pid"]),
            started_unix=float(record["started_unix"]),
        )
    except (orjson.JSONDecodeError, KeyError, ValueError, TypeError):
        return None
