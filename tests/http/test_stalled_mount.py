"""SIGTERM ends the process within ``--shutdown-grace`` + 5 s even while a thread is stuck
in the kernel: a model file on a FUSE mount whose reads never return (a stalled mount).
The waiting client gets 503 ``shutting_down``; the log names what was abandoned; the exit
status is the orderly one. Skipped where FUSE is unavailable (no /dev/fuse, no libfuse,
no mfusepy, or the mount is not permitted)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.scheduling.manager import CLOSE_TIMEOUT_S
from modeld.types import LoopKind
from tests.support.http import poll
from tests.support.server import start_modeld

GRACE_S = 1.0
# The promise is GRACE_S + CLOSE_TIMEOUT_S; the rest is a loaded 2-core machine's slack.
EXIT_WAIT_S = GRACE_S + CLOSE_TIMEOUT_S + 15.0
MODEL = "stalled.gguf"


def _fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse here"
    try:
        import mfusepy  # noqa: F401 - raises when libfuse is missing
    except (ImportError, OSError) as exc:
        return f"mfusepy or libfuse is unavailable: {exc}"
    if os.geteuid() != 0 and not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount for a non-root user"
    return None


def _unmount(mountpoint: Path) -> None:
    for command in (["fusermount3", "-u", "-z"], ["fusermount", "-u", "-z"], ["umount", "-l"]):
        if shutil.which(command[0]):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                subprocess.run([*command, str(mountpoint)], capture_output=True, timeout=10)
                return


@pytest.fixture
def stalled_models_dir(tmp_path: Path, tiny_model_dir: Path) -> Iterator[Path]:
    """A FUSE mount of one model whose reads never return; ``fuse.log`` beside it gets a
    ``read`` line as each reader gets stuck. Reads by the process whose pid is written to
    ``allow.pid`` beside it are served."""
    reason = _fuse_unavailable()
    if reason is not None:
        pytest.skip(reason)
    source, mountpoint = tmp_path / "source", tmp_path / "stalled"
    source.mkdir()
    shutil.copyfile(tiny_model_dir / "tiny-a.gguf", source / MODEL)
    log = (tmp_path / "fuse.log").open("wb")
    fs = subprocess.Popen(
        [sys.executable, "-m", "tests.support.stalled_fs", str(source), str(mountpoint),
         str(tmp_path / "allow.pid")],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )  # fmt: skip
    try:
        deadline_s = time.monotonic() + 20
        while not (mountpoint / MODEL).exists():
            if fs.poll() is not None or time.monotonic() > deadline_s:
                pytest.skip(f"the FUSE mount failed: {(tmp_path / 'fuse.log').read_text()[-300:]}")
            time.sleep(0.1)
        yield mountpoint
    finally:
        _unmount(mountpoint)
        fs.kill()  # a read handler blocks for ever: SIGTERM would not end it
        fs.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("probe", ["probe", "no-probe"])
def test_sigterm_completes_while_a_read_of_a_model_file_hangs_in_the_kernel(
    stalled_models_dir: Path, tmp_path: Path, probe: str
) -> None:
    flags = ["--no-probe-load"] if probe == "no-probe" else []
    server = start_modeld(
        stalled_models_dir, tmp_path, "--threads", "1", "--token-loop", str(LoopKind.C),
        "--shutdown-grace", str(GRACE_S), "--max-wait-ms", "60000", *flags,
    )  # fmt: skip
    try:
        fuse_log = stalled_models_dir.parent / "fuse.log"
        with server.open_infer({"prompt": "hi", "model": MODEL, "stream": False}) as waiting:
            poll(fuse_log.read_text, lambda text: f"read /{MODEL}" in text)  # a reader is stuck
            server.process.send_signal(signal.SIGTERM)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := waiting.recv(65536):
                    answer += chunk
        status = server.process.wait(timeout=EXIT_WAIT_S)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert status == 0
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert json.loads(body)["error"]["code"] == "shutting_down"
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    deadline = [line for line in lines if line["message"].startswith("shutdown deadline passed")]
    assert len(deadline) == 1, server.log()[-3000:]
    assert deadline[0]["abandoned"], deadline[0]  # named, with where each thread is
    assert deadline[0]["exit_status"] == 0


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (its parent has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return True
    return "\nState:\tZ" in status


def test_sigterm_while_the_probe_child_hangs_ends_the_child_and_records_nothing(
    stalled_models_dir: Path, tmp_path: Path
) -> None:
    """The server's own reads work; its probe child's hang. SIGTERM: the child is killed,
    the waiter gets 503 ``shutting_down``, the orderly shutdown needs no deadline, and
    nothing is recorded against the file."""
    state_dir = tmp_path / "state"
    server = start_modeld(
        stalled_models_dir, tmp_path, "--threads", "1", "--token-loop", str(LoopKind.C),
        "--shutdown-grace", str(GRACE_S), "--max-wait-ms", "60000",
        "--state-dir", str(state_dir),
    )  # fmt: skip
    (tmp_path / "allow.pid").write_text(str(server.process.pid))
    fuse_log = tmp_path / "fuse.log"
    try:
        with server.open_infer({"prompt": "hi", "model": MODEL, "stream": False}) as waiting:
            text = poll(fuse_log.read_text, lambda text: f"read /{MODEL} by " in text)
            child = int(text.split(f"read /{MODEL} by ")[1].split()[0])
            assert child != server.process.pid  # the probe child is the one stuck
            server.process.send_signal(signal.SIGTERM)
            answer = b""
            with contextlib.suppress(OSError):
                while chunk := waiting.recv(65536):
                    answer += chunk
        status = server.process.wait(timeout=EXIT_WAIT_S)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    assert status == 0
    assert answer.startswith(b"HTTP/1.1 503"), answer
    assert b'"shutting_down"' in answer
    poll(lambda: _gone(child), bool)
    log = server.log()
    assert "shutdown deadline passed" not in log  # nothing was left stuck in the server
    assert "model_failed" not in log
    listed = subprocess.run(
        [sys.executable, "-m", "modeld.cli", "quarantine", "list",
         "--state-dir", str(state_dir), "--models-dir", str(stalled_models_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout == ""
