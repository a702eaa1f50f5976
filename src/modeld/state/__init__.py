"""The state directory: what has to outlive the process (``--state-dir``).

``verdicts/`` says which model files (by device, inode, size and mtime) passed a probe
load and which are quarantined; ``markers/`` holds one file per stage in which modeld is
handing a file to llama.cpp in-process, so that a restart after a native crash knows
which file, and at which stage, took the process down.
"""

from modeld.state.directory import StateDir
from modeld.state.markers import CrashRecord, StageMarker, StageMarkers
from modeld.state.verdicts import FileVerdicts, Verdict, VerdictKind

__all__ = [
    "CrashRecord",
    "FileVerdicts",
    "StageMarker",
    "StageMarkers",
    "StateDir",
    "Verdict",
    "VerdictKind",
]
