"""Crash containment for model files: quarantine, probe load, stage markers, recovery.

Before a file is handed to llama.cpp in this process, :meth:`FileGuard.vet` refuses it
if it is quarantined, and otherwise (``--probe-load``, the default) probe-loads it in a
child process unless this very file (by identity) already passed a probe with this
llama.cpp. While llama.cpp runs on the file in-process at a risky stage (the load, the
warm-up, the instance's first generation) a stage marker is held in the state dir; the
next process to start (:meth:`FileGuard.recover`) turns every marker left by a dead
process into a logged, counted crash and quarantines that file, so a supervisor's
restart does not walk into the same abort again.

Every quarantine is logged as one audit line (``"audit": true``).
"""

from __future__ import annotations

import getpass
import importlib.metadata
import time
from collections import Counter
from collections.abc import Callable
from typing import Protocol, TypeVar

import anyio
from loguru import logger

from modeld.engine.probe_load import ProbeOutcome, ProbeStatus, probe_load
from modeld.errors import ConfigError, ModelInvalid, ModelLoadFailed
from modeld.gguf import FileIdentity, OpenGguf
from modeld.observability.audit import audit
from modeld.redact import redact_paths
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings
from modeld.state import CrashRecord, FileVerdicts, StageMarkers, StateDir, Verdict, VerdictKind
from modeld.statistics import GuardStatistics

__all__ = [
    "QUARANTINE_STAGES",
    "FileGuard",
    "operator_name",
]

T = TypeVar("T")
# Stages whose crash is the file's doing (a load is deterministic, and so is a first
# generation on a fresh context); a crash in a later generation may be the prompt's.
QUARANTINE_STAGES = ("load", "warm_up", "first_generation")
_PROBE_PROTOCOL = 1
# A probe pays for a fresh interpreter and llama.cpp's import before it loads anything:
# a --load-timeout meant for the load itself is not enough time for it.
PROBE_MIN_TIMEOUT_S = 30.0


def operator_name() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _stamp() -> str:
    version = importlib.metadata.version("llama-cpp-python")
    return f"llama-cpp-python {version}; probe {_PROBE_PROTOCOL}"


class FileGuard:
    """One per manager; its file I/O runs on threads, never on the event loop."""

    def __init__(self, settings: LiveSettings) -> None:
        self._live = settings
        state = StateDir(settings.current.state_path)  # restart-required: read once
        self._verdicts = FileVerdicts(state, _stamp())
        self._markers = StageMarkers(state)
        self._probes: Counter[str] = Counter()
        self._crashes: Counter[tuple[str, str]] = Counter()
        self._quarantined = 0
        self._state_dir_ok = True
        self._in_memory: dict[FileIdentity, Verdict] = {}  # when the state dir is unusable

    @property
    def _settings(self) -> Settings:
        return self._live.current

    def statistics(self) -> GuardStatistics:
        return GuardStatistics(
            probe_load=self._settings.probe_load,
            state_dir_ok=self._state_dir_ok,
            quarantined_files=self._quarantined,
            probes=dict(self._probes),
            crashes=tuple(
                (model, stage, count) for (model, stage), count in sorted(self._crashes.items())
            ),
        )

    async def recover(self) -> list[CrashRecord]:
        """Claim the stage markers of processes that died in a stage; log, count and
        (for :data:`QUARANTINE_STAGES`) quarantine each.

        A state dir that cannot be written (a read-only container without a volume for
        it) is not fatal: modeld serves, keeping verdicts in memory for this process
        only, and says so once, as a warning.
        """
        try:
            crashes = await anyio.to_thread.run_sync(self._markers.recover)
        except (OSError, ConfigError) as exc:
            self._state_dir_ok = False
            logger.warning(
                "no usable state dir: crashes, quarantines and probe results are not kept "
                "across restarts (set --state-dir to a writable directory)",
                error=redact_paths(str(exc)),
            )
            return []
        for crash in crashes:
            self._crashes[(crash.model_id, crash.stage)] += 1
            logger.error(
                "crash detected: a previous modeld process died while llama.cpp ran on a "
                "model file",
                model=crash.model_id,
                stage=crash.stage,
                pid=crash.pid,
                started_unix=round(crash.started_unix, 3),
            )
            if crash.stage in QUARANTINE_STAGES:
                reason = f"the modeld process died during its {crash.stage.replace('_', ' ')}"
                await self._quarantine(crash.model_id, crash.identity, reason, "crash", crash.stage)
        await self._count_quarantined()
        return crashes

    async def _count_quarantined(self) -> None:
        """Counted from the state dir (another process, or the CLI, may change it)."""
        if self._state_dir_ok:
            found = await anyio.to_thread.run_sync(self._verdicts.quarantined)
            self._quarantined = len(found)
        else:
            kinds = [verdict.kind for verdict in self._in_memory.values()]
            self._quarantined = kinds.count(VerdictKind.QUARANTINED)

    async def _get(self, identity: FileIdentity) -> Verdict | None:
        if not self._state_dir_ok:
            return self._in_memory.get(identity)
        return await anyio.to_thread.run_sync(lambda: self._verdicts.get(identity))

    async def _put(self, record: Callable[[_VerdictWriter], Verdict]) -> None:
        """Write a verdict; kept in memory when the state dir is unusable."""
        if self._state_dir_ok:
            try:
                await anyio.to_thread.run_sync(lambda: record(self._verdicts))
                return
            except (OSError, ConfigError) as exc:
                self._state_dir_ok = False
                logger.warning("state dir write failed", error=redact_paths(str(exc)))
        verdict = record(_MemoryVerdicts(self._verdicts.stamp))
        self._in_memory[verdict.identity] = verdict

    async def vet(self, opened: OpenGguf, n_ctx_train: int) -> bool:
        """Refuse a quarantined file; probe-load an unknown one. Returns whether a probe
        ran. Raises :class:`ModelInvalid` (quarantined, or the probe aborted: the file
        is then quarantined) or :class:`ModelLoadFailed` (the probe was refused cleanly,
        killed, or timed out: nothing is recorded)."""
        model_id, identity = opened.label, opened.identity
        verdict = await self._get(identity)
        if verdict is not None and verdict.kind is VerdictKind.QUARANTINED:
            raise ModelInvalid(
                f"{model_id} is quarantined: {verdict.reason}. It stays refused until the "
                f"file changes or an operator runs `modeld quarantine clear {model_id}`"
            )
        if verdict is not None or not self._settings.probe_load:
            return False
        outcome = await probe_load(
            opened.fd,
            model_id,
            n_ctx_train=n_ctx_train,
            threads=min(self._settings.n_threads, 4),
            token_loop=self._settings.token_loop,
            timeout_s=max(self._settings.load_timeout, PROBE_MIN_TIMEOUT_S),
        )
        self._probes[str(outcome.status)] += 1
        await self._settle_probe(model_id, identity, outcome)
        return True

    async def _settle_probe(
        self, model_id: str, identity: FileIdentity, outcome: ProbeOutcome
    ) -> None:
        stage = outcome.stage
        if outcome.status is ProbeStatus.PASSED:
            await self._put(lambda verdicts: verdicts.mark_good(model_id, identity))
            logger.info(
                "probe load passed", model=model_id, probe_ms=round(outcome.duration_s * 1000)
            )
            return
        if outcome.status is ProbeStatus.ABORTED:
            reason = f"a probe load in a child process was {outcome.detail} (stage: {stage})"
            await self._quarantine(model_id, identity, reason, "probe", stage)
            raise ModelInvalid(
                f"{model_id}: {reason}; the file is quarantined until it changes or "
                f"`modeld quarantine clear {model_id}`"
            )
        if outcome.status is ProbeStatus.REFUSED:
            raise ModelLoadFailed(f"{model_id}: {outcome.detail}")
        raise ModelLoadFailed(
            f"{model_id}: the probe load {str(outcome.status).replace('_', ' ')} "
            f"({outcome.detail}, stage: {stage}); nothing is recorded against the file"
        )

    async def _quarantine(
        self, model_id: str, identity: FileIdentity, reason: str, source: str, stage: str
    ) -> None:
        await self._put(
            lambda verdicts: verdicts.quarantine(model_id, identity, reason, source, stage)
        )
        await self._count_quarantined()
        audit("quarantine", model_id, "modeld", "quarantined", reason=reason, source=source)

    def staged(self, model_id: str, identity: FileIdentity, stage: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` (llama.cpp on the file, in this process) inside a stage marker.

        Call on the thread that runs ``fn``. A marker that cannot be written (a full or
        read-only state dir) is logged, and ``fn`` runs unguarded rather than not at all.
        """
        if not self._state_dir_ok:
            return fn()
        try:
            marker = self._markers.begin(model_id, identity, stage)
        except (OSError, ConfigError) as exc:
            self._state_dir_ok = False
            logger.warning(
                "stage marker not written: a crash now would go unrecorded",
                model=model_id,
                stage=stage,
                error=redact_paths(str(exc)),
            )
            return fn()
        try:
            return fn()
        finally:
            marker.end()


class _VerdictWriter(Protocol):
    def mark_good(self, model_id: str, identity: FileIdentity) -> Verdict: ...

    def quarantine(
        self, model_id: str, identity: FileIdentity, reason: str, source: str, stage: str | None
    ) -> Verdict: ...


class _MemoryVerdicts:
    """Makes :class:`Verdict` objects as :class:`FileVerdicts` does, writing nothing."""

    def __init__(self, stamp: str) -> None:
        self.stamp = stamp

    def mark_good(self, model_id: str, identity: FileIdentity) -> Verdict:
        return Verdict(VerdictKind.GOOD, model_id, identity, "passed a probe load", "probe",
                       stamp=self.stamp, when_unix=time.time())  # fmt: skip

    def quarantine(
        self, model_id: str, identity: FileIdentity, reason: str, source: str, stage: str | None
    ) -> Verdict:
        return Verdict(VerdictKind.QUARANTINED, model_id, identity, reason, source, stage,
                       stamp=self.stamp, when_unix=time.time())  # fmt: skip
