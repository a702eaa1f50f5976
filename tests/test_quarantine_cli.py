"""``modeld quarantine list|clear`` on a state dir: what it prints, what it clears, its
exit status, and its audit line per clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modeld.gguf import FileIdentity
from modeld.state import FileVerdicts, StateDir


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    models, state = tmp_path / "models", tmp_path / "state"
    models.mkdir()
    (models / "a.gguf").write_bytes(b"a")
    (models / "b.gguf").write_bytes(b"b")
    verdicts = FileVerdicts(StateDir(state), "stamp")
    a = FileIdentity.of(os.stat(models / "a.gguf"))
    verdicts.quarantine("a.gguf", a, "aborted", "probe", "tokenize")
    verdicts.quarantine("b.gguf", FileIdentity(1, 2, 3, 4), "died", "crash", "load")
    verdicts.quarantine("c.gguf", FileIdentity(5, 6, 7, 8), "died", "crash", "warm_up")
    verdicts.mark_good("d.gguf", FileIdentity(9, 9, 9, 9))  # not listed: it is good
    return models, state


def run(*argv: str) -> tuple[int, str, str]:
    done = subprocess.run(
        [sys.executable, "-m", "modeld.cli", *argv], capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def test_list_says_whether_each_file_is_still_there(
    dirs: tuple[Path, Path],
) -> None:
    models, state = dirs
    flags = ("--state-dir", str(state), "--models-dir", str(models))
    status, out, _ = run("quarantine", "list", *flags)
    assert status == 0
    rows = [line.split("\t") for line in out.strip().splitlines()]
    assert [(row[0], row[1], row[3]) for row in rows] == [
        ("a.gguf", "current", "probe/tokenize"),
        ("b.gguf", "changed", "crash/load"),
        ("c.gguf", "gone", "crash/warm_up"),
    ]


def test_clear_one_then_all_with_an_audit_line_each(
    dirs: tuple[Path, Path],
) -> None:
    models, state = dirs
    flags = ("--state-dir", str(state), "--models-dir", str(models))
    status, out, err = run("quarantine", "clear", "b.gguf", *flags)
    assert (status, out) == (0, "cleared\tb.gguf\n")
    audit = json.loads(err.strip().splitlines()[-1])
    assert (audit["audit"], audit["action"], audit["target"], audit["outcome"]) == (
        True, "quarantine_clear", "b.gguf", "cleared",
    )  # fmt: skip
    status, out, err = run("quarantine", "clear", "--all", *flags)
    assert (status, out) == (0, "cleared\ta.gguf\ncleared\tc.gguf\n")
    assert len(err.strip().splitlines()) == 2
    assert run("quarantine", "list", *flags)[1] == ""
    assert run("quarantine", "clear", "--all", *flags)[0] == 1  # nothing left


@pytest.mark.parametrize(
    "args", [(), ("a.gguf", "--all"), ("../a.gguf",)], ids=["none", "both", "unsafe-id"]
)
def test_clear_needs_exactly_one_safe_target(
    dirs: tuple[Path, Path], args: tuple[str, ...]
) -> None:
    _models, state = dirs
    status, _, _ = run("quarantine", "clear", *args, "--state-dir", str(state))
    assert status == 2
    assert len(FileVerdicts(StateDir(state), "stamp").quarantined()) == 3
