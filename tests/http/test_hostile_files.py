"""Hostile model files through the real server, with the probe load off: the validator
alone must refuse each (422 ``model_invalid``, with the reason) before llama.cpp sees
it, since some of them abort the whole process (tests/gguf/test_hostile_models.py
measures which). The server stays up and the other models keep generating."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.gguf.test_hostile_models import WHY
from tests.support.hostile_models import HOSTILE_MODELS, write_hostile
from tests.support.http import ServerFactory
from tests.support.server import RunningServer

HOSTILE = sorted(HOSTILE_MODELS)
GREEDY = {"max_tokens": 2, "temperature": 0, "stream": False}


@pytest.fixture(scope="module")
def hostile_models_dir(module_models_dir: Path) -> Path:
    for name in HOSTILE:
        path = write_hostile(module_models_dir, name)
        (module_models_dir / f"load-{name}.gguf").write_bytes(path.read_bytes())
    return module_models_dir


@pytest.fixture(scope="module")
def server(hostile_models_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(hostile_models_dir, "--no-probe-load")


def assert_still_serving(server: RunningServer, client: httpx.Client) -> None:
    assert server.process.poll() is None, server.log()[-3000:]
    ok = client.post("/infer", json={**GREEDY, "prompt": "hello", "model": "tiny-a.gguf"})
    assert ok.status_code == 200
    assert ok.json()["metrics"]["completion_tokens"] == 2


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_via_infer_with_byte_fallback(
    server: RunningServer, client: httpx.Client, name: str
) -> None:
    """``café ü`` needs byte tokens the broken vocabularies lack: were the file loaded,
    this prompt would abort the process."""
    body = {**GREEDY, "prompt": "café ü", "model": f"{name}.gguf"}
    response = client.post("/infer", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_invalid"
    assert f"{name}.gguf" in error["message"]
    assert WHY[name].split(" .*")[0].replace("\\", "") in error["message"]
    assert_still_serving(server, client)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_file_via_load(server: RunningServer, client: httpx.Client, name: str) -> None:
    response = client.post(f"/models/load-{name}.gguf/load")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "model_invalid"
    assert_still_serving(server, client)


def test_nothing_hostile_was_ever_mapped(server: RunningServer, client: httpx.Client) -> None:
    """No hostile file is in the server's address space: each was refused before
    llama.cpp opened it (the probe is off, so no child opened it either). A loaded model
    is mapped (by its real name, although llama.cpp opened /proc/self/fd/N)."""
    for name in HOSTILE:
        client.post("/infer", json={**GREEDY, "prompt": "x", "model": f"{name}.gguf"})
    assert_still_serving(server, client)
    maps = Path(f"/proc/{server.process.pid}/maps").read_text()
    assert "tiny-a.gguf" in maps
    for name in HOSTILE:
        assert f"{name}.gguf" not in maps
