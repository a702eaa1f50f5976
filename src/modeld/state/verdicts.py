"""What is known about a model file, by its identity (device, inode, size, mtime).

A file that passed a probe load is ``good`` for the llama.cpp build (and probe) that
passed it: a restart, or another load of the same file, needs no probe. A file that
aborted a probe load, or took the process down while it was being loaded or first
generated from, is ``quarantined``: refused (422) until it changes (a new identity) or
an operator clears it (``modeld quarantine clear``). Keyed by identity, never by name,
so a renamed file keeps its verdict and a rewritten one loses it.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from pathlib import Path

from modeld.gguf import FileIdentity
from modeld.state.directory import StateDir

__all__ = ["FileVerdicts", "Verdict", "VerdictKind"]


class VerdictKind(enum.StrEnum):
    GOOD = "good"
    QUARANTINED = "quarantined"


@dataclass(frozen=True, slots=True)
class Verdict:
    kind: VerdictKind
    model_id: str
    identity: FileIdentity
    reason: str
    source: str  # "probe" or "crash"
    stage: str | None = None  # for a crash: "load", "warm_up", "first_generation"
    stamp: str = ""  # the llama.cpp build and probe protocol that gave a good verdict
    when_unix: float = 0.0

    def record(self) -> dict[str, object]:
        return {
            "kind": str(self.kind),
            "model": self.model_id,
            "identity": _identity_record(self.identity),
            "reason": self.reason,
            "source": self.source,
            "stage": self.stage,
            "stamp": self.stamp,
            "when_unix": self.when_unix,
        }

    @classmethod
    def from_record(cls, record: dict[str, object]) -> Verdict | None:
        """None for a record this version cannot read (it is then ignored)."""
        try:
            identity = record["identity"]
            assert isinstance(identity, dict)
            stage = record.get("stage")
            return cls(
                kind=VerdictKind(str(record["kind"])),
                model_id=str(record["model"]),
                identity=FileIdentity(
                    int(identity["device"]),
                    int(identity["inode"]),
                    int(identity["size_bytes"]),
                    int(identity["mtime_ns"]),
                ),
                reason=str(record["reason"]),
                source=str(record["source"]),
                stage=None if stage is None else str(stage),
                stamp=str(record.get("stamp", "")),
                when_unix=float(str(record.get("when_unix", 0.0))),
            )
        except (KeyError, ValueError, TypeError, AssertionError):
            return None


def _identity_record(identity: FileIdentity) -> dict[str, int]:
    return {
        "device": identity.device,
        "inode": identity.inode,
        "size_bytes": identity.size_bytes,
        "mtime_ns": identity.mtime_ns,
    }


def _key(identity: FileIdentity) -> str:
    return f"{identity.device}-{identity.inode}-{identity.size_bytes}-{identity.mtime_ns}.json"


class FileVerdicts:
    """The ``verdicts/`` directory. Blocking file I/O: call it off the event loop.

    ``stamp`` names the llama.cpp build and probe protocol of this process: a ``good``
    verdict given under another stamp does not count (the file is probed again).
    """

    def __init__(self, state: StateDir, stamp: str) -> None:
        self._state = state
        self.stamp = stamp

    @property
    def _dir(self) -> Path:
        return self._state.sub("verdicts")

    def get(self, identity: FileIdentity) -> Verdict | None:
        record = self._state.read(self._dir / _key(identity))
        verdict = Verdict.from_record(record) if record is not None else None
        if verdict is None or verdict.identity != identity:
            return None
        if verdict.kind is VerdictKind.GOOD and verdict.stamp != self.stamp:
            return None
        return verdict

    def mark_good(self, model_id: str, identity: FileIdentity) -> Verdict:
        verdict = Verdict(
            VerdictKind.GOOD,
            model_id,
            identity,
            reason="passed a probe load",
            source="probe",
            stamp=self.stamp,
            when_unix=time.time(),
        )
        self._state.write(self._dir, _key(identity), verdict.record())
        return verdict

    def quarantine(
        self, model_id: str, identity: FileIdentity, reason: str, source: str, stage: str | None
    ) -> Verdict:
        verdict = Verdict(
            VerdictKind.QUARANTINED,
            model_id,
            identity,
            reason=reason,
            source=source,
            stage=stage,
            stamp=self.stamp,
            when_unix=time.time(),
        )
        self._state.write(self._dir, _key(identity), verdict.record())
        return verdict

    def quarantined(self) -> list[Verdict]:
        found = []
        for path in self._state.records(self._dir):
            record = self._state.read(path)
            verdict = Verdict.from_record(record) if record is not None else None
            if verdict is not None and verdict.kind is VerdictKind.QUARANTINED:
                found.append(verdict)
        return sorted(found, key=lambda verdict: (verdict.model_id, verdict.when_unix))

    def clear(self, model_id: str | None) -> list[Verdict]:
        """Lift the quarantine of ``model_id``'s files (every file's when None); returns
        the verdicts removed. The next load of such a file is probed again."""
        cleared = []
        for verdict in self.quarantined():
            if model_id is None or verdict.model_id == model_id:
                (self._dir / _key(verdict.identity)).unlink(missing_ok=True)
                cleared.append(verdict)
        return cleared
