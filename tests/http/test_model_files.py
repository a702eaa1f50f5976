"""Bad, changing and missing model files through the real server: a corrupt header is 422
``model_invalid`` and never a crash; a file llama.cpp refuses is 500 then a cooldown; a
file rewritten under a loaded instance is reloaded before the next generation."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import httpx
import pytest

from tests.conftest import private_copy
from tests.support.gguf_bytes import U32, base_spec, build_gguf, enc_value, rewrite_gguf
from tests.support.http import ServerFactory, instance_of, poll
from tests.support.server import RunningServer

GREEDY = {"prompt": "hello", "max_tokens": 8, "temperature": 0, "stream": False}


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value) :]


def corrupt_files(tiny: Path, scratch: Path) -> dict[str, bytes]:
    """Each a GGUF that modeld's header validation must refuse (some abort llama.cpp)."""
    data = tiny.read_bytes()

    def with_kv(key: str, value: int) -> bytes:
        target = scratch / f"{key}-{value}.gguf"
        return rewrite_gguf(tiny, target, set_kv={key: enc_value(U32, value)}).read_bytes()

    return {
        "empty": b"",
        "text-file": b"this is not a model\n",
        "magic-only": b"GGUF",
        "wrong-magic": b"GGUX" + data[4:],
        "version-1": patched(data, 4, struct.pack("<I", 1)),
        "version-4": patched(data, 4, struct.pack("<I", 4)),
        "truncated-header": data[:200],
        "truncated-half": data[: len(data) // 2],
        "truncated-last-byte": data[:-1],
        "n-tensors-2pow40": patched(data, 8, struct.pack("<Q", 1 << 40)),
        "n-kv-2pow40": patched(data, 16, struct.pack("<Q", 1 << 40)),
        "key-length-2pow50": patched(data, 24, struct.pack("<Q", 1 << 50)),
        "block-count-600": with_kv("llama.block_count", 600),  # aborts llama.cpp
        "block-count-0": with_kv("llama.block_count", 0),
        "context-length-2pow31-1": with_kv("llama.context_length", 2**31 - 1),
        "context-length-0": with_kv("llama.context_length", 0),
        "head-count-0": with_kv("llama.attention.head_count", 0),
    }


@pytest.fixture(scope="module")
def corrupt_names(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    return sorted(corrupt_files(tiny_model_dir / "tiny-a.gguf", tmp_path_factory.mktemp("x")))


@pytest.fixture(scope="module")
def corrupt_models_dir(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, module_models_dir: Path
) -> Path:
    scratch = tmp_path_factory.mktemp("scratch")
    for name, data in corrupt_files(tiny_model_dir / "tiny-a.gguf", scratch).items():
        (module_models_dir / f"{name}.gguf").write_bytes(data)  # for POST /infer
        (module_models_dir / f"load-{name}.gguf").write_bytes(data)  # for POST /models/{id}/load
    return module_models_dir


@pytest.fixture(scope="module")
def server(corrupt_models_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(corrupt_models_dir)


CORRUPT = sorted([
    "empty", "text-file", "magic-only", "wrong-magic", "version-1", "version-4",
    "truncated-header", "truncated-half", "truncated-last-byte", "n-tensors-2pow40",
    "n-kv-2pow40", "key-length-2pow50", "block-count-600", "block-count-0",
    "context-length-2pow31-1", "context-length-0", "head-count-0",
])  # fmt: skip


def assert_others_still_generate(server: RunningServer, client: httpx.Client) -> None:
    assert server.process.poll() is None, server.log()[-2000:]
    assert client.get("/healthz").status_code == 200
    ok = client.post("/infer", json={**GREEDY, "model": "tiny-a.gguf", "max_tokens": 2})
    assert ok.status_code == 200
    assert ok.json()["metrics"]["completion_tokens"] == 2


def test_the_case_list_matches_the_files(corrupt_names: list[str]) -> None:
    assert corrupt_names == CORRUPT


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_file_via_infer(server: RunningServer, client: httpx.Client, name: str) -> None:
    response = client.post("/infer", json={**GREEDY, "model": f"{name}.gguf"})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "model_invalid"
    assert f"{name}.gguf" in error["message"]
    assert_others_still_generate(server, client)


@pytest.mark.parametrize("name", CORRUPT)
def test_corrupt_file_via_load(server: RunningServer, client: httpx.Client, name: str) -> None:
    response = client.post(f"/models/load-{name}.gguf/load")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "model_invalid"
    assert_others_still_generate(server, client)


def test_corrupt_file_retried_at_once_is_cooling_down(client: httpx.Client) -> None:
    first = client.post("/infer", json={**GREEDY, "model": "truncated-half.gguf"})
    if first.status_code == 422:  # not yet asked by an earlier test
        first = client.post("/infer", json={**GREEDY, "model": "truncated-half.gguf"})
    assert first.status_code == 503
    assert first.json()["error"]["code"] == "model_cooling_down"
    assert int(first.headers["retry-after"]) >= 1
    assert "truncated-half.gguf" in first.json()["error"]["message"]


# --- a file that passes header validation but that llama.cpp refuses ---------------------


@pytest.fixture
def refused_server(start_server: ServerFactory, models_dir: Path) -> RunningServer:
    (models_dir / "refused.gguf").write_bytes(build_gguf(base_spec()))  # no real weights
    return start_server(models_dir, "--default-model", "tiny-a.gguf")


def test_load_failure_then_cooldown(refused_server: RunningServer) -> None:
    body = {**GREEDY, "model": "refused.gguf"}
    with refused_server.client() as client:
        failed = client.post("/infer", json=body)
        assert failed.status_code == 500, failed.text
        assert failed.json()["error"]["code"] == "model_load_failed"
        cooling = client.post("/infer", json=body)
        assert cooling.status_code == 503
        assert cooling.json()["error"]["code"] == "model_cooling_down"
        assert int(cooling.headers["retry-after"]) >= 1
        also_for_load = client.post("/models/refused.gguf/load")
        assert also_for_load.status_code == 503
        assert also_for_load.json()["error"]["code"] == "model_cooling_down"
        assert client.post("/infer", json=GREEDY).status_code == 200  # others unaffected
        # After the backoff the load is tried again (and fails again): bounded poll.
        retried = poll(
            lambda: client.post("/infer", json=body),
            lambda response: response.status_code != 503,
            timeout_s=5,
            every_s=0.05,
        )
        assert retried.json()["error"]["code"] == "model_load_failed"
        assert refused_server.process.poll() is None


def test_status_shows_the_cooldown(refused_server: RunningServer) -> None:
    with refused_server.client() as client:
        assert client.post("/infer", json={**GREEDY, "model": "refused.gguf"}).status_code == 500
        entry = instance_of(client, "refused.gguf")
    assert entry is not None
    assert entry["last_error"]
    assert float(entry["retry_in_seconds"]) > 0  # type: ignore[arg-type]


# --- files changed under a loaded instance ---------------------------------------------


def greedy_text(client: httpx.Client, model: str) -> str:
    response = client.post("/infer", json={**GREEDY, "model": model})
    assert response.status_code == 200, response.text
    return str(response.json()["text"])


def loads_total(client: httpx.Client, model: str) -> int:
    entry = instance_of(client, model)
    assert entry is not None
    return int(str(entry["loads_total"]))


def rewrite_in_place(path: Path, data: bytes) -> None:
    """Same inode, new bytes: what a tool that rewrites files does under an mmap."""
    before = path.stat()
    with path.open("r+b") as handle:
        handle.write(data)
        handle.truncate(len(data))
    after = path.stat()
    assert after.st_ino == before.st_ino
    if (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns):
        os.utime(path, ns=(after.st_atime_ns, before.st_mtime_ns + 1))  # coarse clock


def test_file_rewritten_in_place_is_reloaded(start_server: ServerFactory, models_dir: Path) -> None:
    private_copy(models_dir / "tiny-a.gguf")  # it is written into below
    server = start_server(models_dir)
    with server.client() as client:
        text_a = greedy_text(client, "tiny-a.gguf")
        text_b = greedy_text(client, "tiny-b.gguf")
        assert text_a != text_b  # different weights, different greedy text
        assert loads_total(client, "tiny-a.gguf") == 1
        rewrite_in_place(models_dir / "tiny-a.gguf", (models_dir / "tiny-b.gguf").read_bytes())
        assert greedy_text(client, "tiny-a.gguf") == text_b  # the new weights, no garbage
        assert loads_total(client, "tiny-a.gguf") == 2
        assert instance_of(client, "tiny-a.gguf")["state"] == "ready"  # type: ignore[index]


def test_file_truncated_in_place_is_refused_not_a_crash(
    start_server: ServerFactory, models_dir: Path
) -> None:
    path = private_copy(models_dir / "tiny-a.gguf")  # it is written into below
    server = start_server(models_dir)
    with server.client() as client:
        greedy_text(client, "tiny-a.gguf")
        rewrite_in_place(path, path.read_bytes()[: path.stat().st_size // 2])  # SIGBUS bait
        response = client.post("/infer", json={**GREEDY, "model": "tiny-a.gguf"})
        assert response.status_code == 422, response.text
        assert response.json()["error"]["code"] == "model_invalid"
        assert server.process.poll() is None
        assert greedy_text(client, "tiny-b.gguf")


def test_file_replaced_atomically_is_reloaded(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        greedy_text(client, "tiny-a.gguf")
        text_c = greedy_text(client, "tiny-c.gguf")
        staged = models_dir / "staged.tmp"
        staged.write_bytes((models_dir / "tiny-c.gguf").read_bytes())
        os.replace(staged, models_dir / "tiny-a.gguf")
        assert greedy_text(client, "tiny-a.gguf") == text_c
        assert loads_total(client, "tiny-a.gguf") == 2


def test_file_deleted_under_a_loaded_instance(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        greedy_text(client, "tiny-a.gguf")
        (models_dir / "tiny-a.gguf").unlink()
        response = client.post("/infer", json={**GREEDY, "model": "tiny-a.gguf"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert [m["id"] for m in client.get("/models").json()["models"]] == [
            "tiny-b.gguf",
            "tiny-c.gguf",
        ]
        assert server.process.poll() is None


def test_empty_models_dir(start_server: ServerFactory, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    server = start_server(empty)
    with server.client() as client:
        assert client.get("/models").json() == {"models": []}
        missing = client.post("/infer", json={"prompt": "x", "model": "a.gguf"})
        assert missing.status_code == 404
        no_default = client.post("/infer", json={"prompt": "x"})
        assert no_default.status_code == 400
        assert no_default.json()["error"]["code"] == "no_default_model"
        assert client.get("/readyz").status_code == 503
