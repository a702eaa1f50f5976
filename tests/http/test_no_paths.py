"""No absolute filesystem path in an error body, in ``/status``, or in a log line at info
or above (issue 11, item 6): llama.cpp's messages name files by path (and modeld hands
it ``/proc/self/fd/N``); what leaves the process names them by model id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.gguf_bytes import base_spec, build_gguf
from tests.support.hostile_models import write_hostile
from tests.support.http import ServerFactory

INFO_AND_ABOVE = {"info", "success", "warning", "error", "critical"}


@pytest.fixture
def bad_models_dir(models_dir: Path) -> Path:
    (models_dir / "refused.gguf").write_bytes(build_gguf(base_spec()))  # llama.cpp refuses it
    (models_dir / "corrupt.gguf").write_bytes(b"GGUF" + b"\0" * 64)
    write_hostile(models_dir, "t5-hostile-charsmap")  # its probe load aborts
    return models_dir


def test_errors_status_and_logs_carry_no_absolute_path(
    start_server: ServerFactory, bad_models_dir: Path, tmp_path: Path
) -> None:
    state_dir = tmp_path / "state"
    server = start_server(bad_models_dir, "--state-dir", str(state_dir))
    bodies = []
    with server.client() as client:
        for model in ["refused.gguf", "corrupt.gguf", "t5-hostile-charsmap.gguf"]:
            response = client.post("/infer", json={"prompt": "café", "model": model})
            assert response.status_code in {422, 500}, response.text
            bodies.append(response.text)
        bodies.append(client.get("/status").text)
        tiny = {"prompt": "x", "model": "tiny-a.gguf", "max_tokens": 1, "stream": False}
        assert client.post("/infer", json=tiny).status_code == 200
    refused = json.loads(bodies[0])["error"]["message"]
    assert "llama.cpp could not load refused.gguf" in refused  # llama.cpp's words, kept
    forbidden = [str(bad_models_dir), str(state_dir), "/proc/self/fd", str(tmp_path)]
    for body in bodies:
        for path in forbidden:
            assert path not in body, (path, body)
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    loud = [line for line in lines if line["level"] in INFO_AND_ABOVE]
    assert sum(line["message"] == "model_error" for line in loud) == 3  # the failures logged
    for line in loud:
        for path in forbidden:
            assert path not in json.dumps(line), (path, line)
