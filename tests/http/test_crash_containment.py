"""Crash containment through real servers, with a real abort.

The file: a T5-vocabulary tiny model whose normalisation table is wrong only for bytes
of 0x80 and above. It passes every static check and loads; the first prompt with such
a byte makes llama.cpp throw from inside ``llama_tokenize``, which ends the process
(SIGABRT). With the probe load on, a child process finds that out and the file is
quarantined; with it off, a server really dies, and the next start quarantines the file.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.hostile_models import write_hostile
from tests.support.http import ServerFactory, poll
from tests.support.server import RunningServer
from tests.support.tiny_gguf import write_tiny_gguf

HOSTILE = "t5-hostile-charsmap.gguf"
ACCENTED = {"prompt": "café", "max_tokens": 2, "temperature": 0, "stream": False}


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """Its own state dir: the quarantines these tests cause stay here."""
    return tmp_path / "state"


@pytest.fixture
def hostile_models_dir(models_dir: Path) -> Path:
    write_hostile(models_dir, HOSTILE.removesuffix(".gguf"))
    return models_dir


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """One sample from /metrics (0 when absent)."""
    wanted = name + (
        "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    )
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return 0.0


def json_lines(server: RunningServer) -> list[dict[str, object]]:
    return [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]


def quarantine_cli(
    state_dir: Path, models_dir: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "modeld.cli", "quarantine", *args,
         "--state-dir", str(state_dir), "--models-dir", str(models_dir)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def assert_tiny_generates(server: RunningServer, client: httpx.Client) -> None:
    assert server.process.poll() is None, server.log()[-3000:]
    ok = client.post("/infer", json={**ACCENTED, "model": "tiny-a.gguf"})
    assert ok.status_code == 200, ok.text
    assert ok.json()["metrics"]["completion_tokens"] == 2


def test_the_probe_load_catches_the_abort_and_quarantines_the_file(
    start_server: ServerFactory, hostile_models_dir: Path, state_dir: Path
) -> None:
    server = start_server(hostile_models_dir, "--state-dir", str(state_dir))
    with server.client() as client:
        refused = client.post("/infer", json={**ACCENTED, "model": HOSTILE})
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "model_invalid"
        assert "SIGABRT" in error["message"]
        assert "Index out of array bounds in XCDA array" in error["message"]
        assert "stage: tokenize" in error["message"]
        assert "Warning" not in error["message"]  # llama.cpp's words only, no Python noise
        assert str(hostile_models_dir) not in refused.text  # no absolute path
        assert_tiny_generates(server, client)
        assert metric(client, "modeld_probe_loads_total", outcome="aborted") == 1
        assert metric(client, "modeld_quarantined_files") == 1
        status = client.get("/status").json()["crash_containment"]
        assert status["quarantined_files"] == 1
        assert status["probe_load"] is True
        # asked again: refused from the record, no second probe
        again = client.post(f"/models/{HOSTILE}/load")
        assert again.status_code in {422, 503}  # 503: the failed load's cooldown
        assert metric(client, "modeld_probe_loads_total", outcome="aborted") == 1
    audits = [line for line in json_lines(server) if line.get("audit")]
    quarantines = [line for line in audits if line["action"] == "quarantine"]
    assert len(quarantines) == 1  # the second ask read the record: no second verdict
    assert quarantines[0]["target"] == HOSTILE
    assert quarantines[0]["who"] == "modeld"

    # A restart reads the verdict from disk: still refused, still no probe.
    server.stop()
    restarted = start_server(hostile_models_dir, "--state-dir", str(state_dir))
    with restarted.client() as client:
        refused = client.post("/infer", json={**ACCENTED, "model": HOSTILE})
        assert refused.status_code == 422
        assert "is quarantined" in refused.json()["error"]["message"]
        assert metric(client, "modeld_probe_loads_total", outcome="aborted") == 0
        assert metric(client, "modeld_quarantined_files") == 1


def test_a_changed_file_is_probed_again_and_a_cleared_one_too(
    start_server: ServerFactory, hostile_models_dir: Path, state_dir: Path
) -> None:
    server = start_server(hostile_models_dir, "--state-dir", str(state_dir))
    with server.client() as client:
        assert client.post("/infer", json={**ACCENTED, "model": HOSTILE}).status_code == 422
    listed = quarantine_cli(state_dir, hostile_models_dir, "list")
    assert listed.returncode == 0
    model, file_now, _since, cause, reason = listed.stdout.strip().split("\t")
    assert (model, file_now, cause) == (HOSTILE, "current", "probe/tokenize")
    assert "SIGABRT" in reason
    assert "Warning" not in reason

    cleared = quarantine_cli(state_dir, hostile_models_dir, "clear", HOSTILE)
    assert cleared.returncode == 0
    assert cleared.stdout.strip() == f"cleared\t{HOSTILE}"
    audit = json.loads(cleared.stderr.strip().splitlines()[-1])
    assert (audit["action"], audit["target"], audit["outcome"]) == (
        "quarantine_clear", HOSTILE, "cleared",
    )  # fmt: skip
    assert quarantine_cli(state_dir, hostile_models_dir, "list").stdout == ""
    assert quarantine_cli(state_dir, hostile_models_dir, "clear", HOSTILE).returncode == 1

    # Replaced by a good model: a new identity, probed and served.
    staged = write_tiny_gguf(hostile_models_dir / "staged.tmp")
    os.replace(staged, hostile_models_dir / HOSTILE)
    with server.client() as client:
        served = poll(
            lambda: client.post("/infer", json={**ACCENTED, "model": HOSTILE}),
            lambda response: response.status_code != 503,  # the failed load's backoff
            timeout_s=5,
            every_s=0.05,
        )
        assert served.status_code == 200, served.text
        assert metric(client, "modeld_probe_loads_total", outcome="passed") >= 1


def test_a_real_abort_kills_a_server_and_its_restart_quarantines_the_file(
    start_server: ServerFactory, hostile_models_dir: Path, state_dir: Path
) -> None:
    """The crash loop, broken: without the probe, a real abort takes the server down
    during the file's first generation; the restart logs it, counts it and refuses the
    file instead of dying on it again."""
    flags = ("--no-probe-load", "--state-dir", str(state_dir))
    server = start_server(hostile_models_dir, *flags)
    with server.client() as client:
        assert_tiny_generates(server, client)
        with pytest.raises(httpx.TransportError):
            client.post("/infer", json={**ACCENTED, "model": HOSTILE})
    assert server.process.wait(timeout=60) == -signal.SIGABRT
    log = server.log()
    assert "Fatal Python error: Aborted" in log  # faulthandler, despite fd 2 games
    assert "llama_engine.py" in log
    assert "in tokenize" in log

    restarted = start_server(hostile_models_dir, *flags)
    crash = next(line for line in json_lines(restarted) if "crash detected" in str(line["message"]))
    assert (crash["level"], crash["model"], crash["stage"]) == (
        "error", HOSTILE, "first_generation",
    )  # fmt: skip
    assert crash["pid"] == server.process.pid
    with restarted.client() as client:
        crashes = metric(client, "modeld_crashes_total", model=HOSTILE, stage="first_generation")
        assert crashes == 1
        refused = client.post("/infer", json={**ACCENTED, "model": HOSTILE})
        assert refused.status_code == 422, refused.text
        message = refused.json()["error"]["message"]
        assert "is quarantined" in message
        assert "died during its first generation" in message
        assert_tiny_generates(restarted, client)
    audit = next(line for line in json_lines(restarted) if line.get("audit"))
    assert (audit["action"], audit["target"], audit["source"]) == ("quarantine", HOSTILE, "crash")

    # A third start finds no new crash, and the file is still refused.
    restarted.stop()
    third = start_server(hostile_models_dir, *flags)
    assert not [line for line in json_lines(third) if "crash detected" in str(line["message"])]
    with third.client() as client:
        assert client.post("/infer", json={**ACCENTED, "model": HOSTILE}).status_code == 422
        assert metric(client, "modeld_crashes_total", model=HOSTILE, stage="first_generation") == 0


def test_without_a_usable_state_dir_it_serves_and_remembers_in_memory(
    start_server: ServerFactory, hostile_models_dir: Path, tmp_path: Path
) -> None:
    """A read-only container without a volume for the state dir: a warning, then the
    same protection for the life of the process."""
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    server = start_server(hostile_models_dir, "--state-dir", str(blocked / "state"))
    warning = next(
        line for line in json_lines(server) if "no usable state dir" in str(line["message"])
    )
    assert warning["level"] == "warning"
    with server.client() as client:
        first = client.post("/infer", json={**ACCENTED, "model": HOSTILE})
        assert first.status_code == 422
        assert "SIGABRT" in first.json()["error"]["message"]
        assert_tiny_generates(server, client)
        assert client.get("/status").json()["crash_containment"]["state_dir_ok"] is False
        again = poll(
            lambda: client.post("/infer", json={**ACCENTED, "model": HOSTILE}),
            lambda response: response.status_code != 503,
            timeout_s=5,
            every_s=0.05,
        )
        assert again.status_code == 422
        assert "is quarantined" in again.json()["error"]["message"]
        assert metric(client, "modeld_probe_loads_total", outcome="aborted") == 1
