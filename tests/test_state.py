"""The state dir: stage markers are claimed only after their process died (a live one,
even this process's, is left alone), once; verdicts are keyed by file identity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from modeld.gguf import FileIdentity
from modeld.state import FileVerdicts, StageMarkers, StateDir, VerdictKind

IDENTITY = FileIdentity(device=1, inode=2, size_bytes=3, mtime_ns=4)

_DIE_INSIDE_A_STAGE = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from modeld.gguf import FileIdentity
    from modeld.state import StageMarkers, StateDir
    markers = StageMarkers(StateDir(Path(sys.argv[1])))
    markers.begin("bad.gguf", FileIdentity(1, 2, 3, 4), "load")
    print("inside", flush=True)
    sys.stdin.read()  # held until the parent kills us
    """
)


def test_a_live_marker_is_not_claimed_and_an_ended_one_is_gone(tmp_path: Path) -> None:
    markers = StageMarkers(StateDir(tmp_path))
    marker = markers.begin("m.gguf", IDENTITY, "load")
    assert markers.recover() == []  # this very process holds it
    assert len(list((tmp_path / "markers").glob("*.json"))) == 1
    marker.end()
    marker.end()  # idempotent
    assert list((tmp_path / "markers").iterdir()) == []
    assert markers.recover() == []


def test_the_marker_of_a_killed_process_is_claimed_once(tmp_path: Path) -> None:
    markers = StageMarkers(StateDir(tmp_path))
    with subprocess.Popen(
        [sys.executable, "-c", _DIE_INSIDE_A_STAGE, str(tmp_path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"inside"
        assert markers.recover() == []  # alive: its lock is held
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    (crash,) = markers.recover()
    assert (crash.model_id, crash.stage, crash.pid) == ("bad.gguf", "load", child.pid)
    assert crash.identity == IDENTITY
    assert markers.recover() == []  # claimed: gone


def test_unreadable_markers_and_temporary_files_are_ignored(tmp_path: Path) -> None:
    markers = StageMarkers(StateDir(tmp_path))
    directory = StateDir(tmp_path).sub("markers")
    (directory / "junk.json").write_bytes(b"\xff not json")
    (directory / ".half-written.tmp").write_bytes(b"{")
    assert markers.recover() == []
    assert not (directory / "junk.json").exists()  # claimed (its owner is gone) and dropped


def test_good_verdicts_count_only_for_the_same_llama_cpp(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    FileVerdicts(state, "llama 1").mark_good("m.gguf", IDENTITY)
    assert FileVerdicts(state, "llama 1").get(IDENTITY) is not None
    assert FileVerdicts(state, "llama 2").get(IDENTITY) is None  # probed again
    other = FileIdentity(1, 2, 3, 5)  # the same inode, rewritten (a new mtime)
    assert FileVerdicts(state, "llama 1").get(other) is None


def test_quarantine_holds_across_builds_until_cleared(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    verdicts = FileVerdicts(state, "llama 1")
    verdicts.quarantine("a.gguf", IDENTITY, "aborted", "probe", "tokenize")
    verdicts.quarantine("b.gguf", FileIdentity(9, 9, 9, 9), "died", "crash", "load")
    later = FileVerdicts(state, "llama 2")
    held = later.get(IDENTITY)
    assert held is not None
    assert held.kind is VerdictKind.QUARANTINED
    assert [v.model_id for v in later.quarantined()] == ["a.gguf", "b.gguf"]
    assert [v.model_id for v in later.clear("a.gguf")] == ["a.gguf"]
    assert later.get(IDENTITY) is None
    assert [v.model_id for v in later.clear(None)] == ["b.gguf"]
    assert later.quarantined() == []


def test_a_corrupt_verdict_is_ignored(tmp_path: Path) -> None:
    state = StateDir(tmp_path)
    verdicts = FileVerdicts(state, "x")
    verdicts.mark_good("m.gguf", IDENTITY)
    (path,) = (tmp_path / "verdicts").glob("*.json")
    path.write_bytes(b'{"kind": "good"}')
    assert verdicts.get(IDENTITY) is None
    path.write_bytes(b"x" * 100_000)  # over the size bound
    assert verdicts.get(IDENTITY) is None


def test_the_state_dir_is_private(tmp_path: Path) -> None:
    StageMarkers(StateDir(tmp_path / "state")).recover()
    assert os.stat(tmp_path / "state" / "markers").st_mode & 0o777 == 0o700
