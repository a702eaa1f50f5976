"""API keys through the real server: the right key, a wrong one, one wrong in its last
byte, none; as ``Authorization: Bearer`` and as ``X-API-Key``; every route but the open
ones protected (routes added later included); a key file with named keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import pytest

from modeld.api.ollama import OLLAMA
from modeld.api.routes import NATIVE
from tests.support.http import GEMMA, ServerFactory, http_request, ndjson, poll, raw_exchange
from tests.support.server import RunningServer

KEY = "mdk-3f9a1c0e5b7d2468ace0-test"
OTHER_KEY = "mdk-other-key-0123456789abcdef"
ALICE, BOB = "alice-key-000111222333444", "bob-key-555666777888999000"
INFER = {"prompt": "hi", "max_tokens": 2, "temperature": 0, "stream": False}


def last_byte_wrong(key: str) -> str:
    return key[:-1] + ("x" if key[-1] != "x" else "y")


@pytest.fixture(scope="module")
def key_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# modeld API keys\nalice:{ALICE}\n\nbob: {BOB}\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def server(
    module_models_dir: Path, module_server_factory: ServerFactory, key_file: Path
) -> RunningServer:
    return module_server_factory(
        module_models_dir, "--default-model", "tiny-a.gguf",
        "--api-key", KEY, "--api-key-file", str(key_file),
    )  # fmt: skip


@pytest.fixture
def anonymous(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        (bearer(KEY), 200),
        ({"X-API-Key": KEY}, 200),
        ({"authorization": f"bearer {KEY}"}, 200),  # the scheme is case-insensitive
        (bearer(ALICE), 200),
        ({"X-API-Key": BOB}, 200),
        (bearer(OTHER_KEY), 401),
        (bearer(last_byte_wrong(KEY)), 401),
        ({"X-API-Key": last_byte_wrong(ALICE)}, 401),
        (bearer(KEY[:-1]), 401),  # one byte short
        (bearer(KEY + "x"), 401),  # one byte long
        ({"Authorization": f"Basic {KEY}"}, 401),
        ({"Authorization": "Bearer"}, 401),
        ({}, 401),
    ],
    ids=[
        "right-bearer", "right-x-api-key", "lower-case-scheme", "named-alice", "named-bob",
        "wrong", "last-byte-wrong", "last-byte-wrong-named", "short", "long", "basic-scheme",
        "empty-bearer", "missing",
    ],
)  # fmt: skip
def test_infer_with_each_key(anonymous: httpx.Client, headers: dict[str, str], status: int) -> None:
    response = anonymous.post("/infer", json=INFER, headers=headers)
    assert response.status_code == status, response.text
    if status == 401:
        error = response.json()["error"]
        assert error["code"] == "unauthorized"
        assert error["request_id"] == response.headers["x-request-id"]
        assert response.headers["www-authenticate"].startswith('Bearer realm="modeld"')
        assert KEY not in response.text
        assert ALICE not in response.text
    else:
        assert response.json()["metrics"]["completion_tokens"] == 2


def test_a_wrong_key_and_a_missing_key_get_different_challenges(anonymous: httpx.Client) -> None:
    missing = anonymous.get("/status")
    wrong = anonymous.get("/status", headers=bearer(OTHER_KEY))
    assert missing.headers["www-authenticate"] == 'Bearer realm="modeld"'
    assert wrong.headers["www-authenticate"] == 'Bearer realm="modeld", error="invalid_token"'


def route_requests() -> list[tuple[str, str]]:
    """One request per route of the app, with path parameters filled in."""
    requests = []
    routes = [(family.prefix, route) for family in (NATIVE, OLLAMA) for route in family.routes()]
    for prefix, route in routes:
        path = (
            (prefix + getattr(route, "path", ""))
            .replace("{model_id}", "tiny-a.gguf")
            .replace("{request_id}", "r1")
        )
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method != "HEAD":
                requests.append((method, path))
    return requests


@pytest.mark.parametrize(("method", "path"), route_requests())
def test_every_route_but_the_open_ones_needs_the_key(
    server: RunningServer, method: str, path: str
) -> None:
    """Walks the app's own route table: a route added later is covered or this fails."""
    body = b'{"prompt": "hi", "max_tokens": 1}' if path == "/infer" else b""
    request = http_request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = raw_exchange(server, request)
    if path in {"/healthz", "/readyz", "/metrics"}:
        assert response.status in {200, 503}, response.body  # readyz: 503 until a model
    elif path == "/api/version":  # Ollama clients probe it first, without a key
        assert response.status == 200, response.body
        assert set(response.json()) == {"version"}
    elif path == "/":  # the status page's HTML; a JSON client (as here) gets the 404
        assert response.status == 404, response.body
    elif path.startswith("/api/"):  # Ollama's routes: Ollama's error shape
        assert response.status == 401, (method, path, response.status)
        assert response.json() == {"error": "an API key is required: Authorization: Bearer <key>"}
    else:
        assert response.status == 401, (method, path, response.status)
        assert response.error_code() == "unauthorized"


def test_the_ollama_client_sends_a_key(server: RunningServer) -> None:
    with ollama.Client(host=server.base_url, headers=bearer(KEY)) as client:
        assert client.list().models[0].model == "tiny-a.gguf:latest"
    with ollama.Client(host=server.base_url) as client, pytest.raises(ollama.ResponseError) as no:
        client.list()
    assert no.value.status_code == 401
    assert no.value.error == "an API key is required: Authorization: Bearer <key>"


def test_an_unknown_route_is_401_not_404(anonymous: httpx.Client) -> None:
    """Without a key nothing about the routes is revealed, not even which exist."""
    assert anonymous.get("/v9/nothing").status_code == 401
    assert anonymous.get("/v9/nothing", headers=bearer(KEY)).status_code == 404


def test_the_openai_routes_need_the_key_as_the_openai_client_sends_it(
    anonymous: httpx.Client,
) -> None:
    assert anonymous.get("/v1/models").status_code == 401
    assert anonymous.get("/v1/models", headers=bearer("wrong-" + KEY)).status_code == 401
    listed = anonymous.get("/v1/models", headers=bearer(KEY))
    assert listed.status_code == 200
    assert listed.json()["object"] == "list"


def test_streams_work_with_a_key_and_the_access_log_names_the_key(
    server: RunningServer, anonymous: httpx.Client
) -> None:
    body = {**INFER, "stream": True}
    with anonymous.stream("POST", "/infer", json=body, headers=bearer(ALICE)) as response:
        assert response.status_code == 200
        lines = ndjson(response.read().decode())
    assert lines[-1]["done"] is True
    line = access_line(server, response.headers["x-request-id"])
    assert line["key_id"] == "alice"
    assert ALICE not in server.log()
    assert KEY not in server.log()


def access_line(server: RunningServer, request_id: str) -> dict[str, object]:
    """The access log line of one request (written once the response has ended)."""

    def find() -> list[dict[str, object]]:
        return [
            json.loads(line)
            for line in server.log().splitlines()
            if request_id in line and '"message":"request"' in line
        ]

    return poll(find, bool)[-1]


def test_a_bare_key_is_named_by_a_hash_prefix(
    server: RunningServer, anonymous: httpx.Client
) -> None:
    response = anonymous.get("/status", headers=bearer(KEY))
    assert response.status_code == 200
    key_id = str(access_line(server, response.headers["x-request-id"])["key_id"])
    assert key_id.startswith("sha256:")
    assert len(key_id) == len("sha256:") + 8


def test_metrics_can_require_the_key_and_the_env_var_sets_it(
    start_server: ServerFactory, models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELD_API_KEY", KEY)
    server = start_server(models_dir, "--metrics-need-key")
    with server.client() as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer(KEY)).status_code == 200
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503  # open, and no default model


def test_without_a_key_everything_is_open_as_before(
    start_server: ServerFactory, models_dir: Path
) -> None:
    server = start_server(models_dir)
    with server.client() as client:
        assert client.get("/status").status_code == 200


@pytest.mark.parametrize(
    ("flags", "complaint"),
    [
        (("--api-key", "short"), "16 to 512 visible ASCII"),
        (("--api-key", "has a space in it somewhere"), "16 to 512 visible ASCII"),
        (("--api-key-file", "/nonexistent/keys.txt"), "cannot read it"),
    ],
    ids=["too-short", "space", "missing-file"],
)
def test_a_bad_key_setting_stops_the_server_at_start(
    tmp_path: Path, flags: tuple[str, ...], complaint: str
) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "modeld.cli", "serve", "--models-dir", str(tmp_path),
         "--port", "0", *flags],
        capture_output=True, text=True, timeout=60, env=dict(os.environ),
    )  # fmt: skip
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert complaint in completed.stderr


def test_a_key_file_with_a_duplicate_name_is_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(f"a:{ALICE}\na:{BOB}\n")
    completed = subprocess.run(
        [sys.executable, "-m", "modeld.cli", "serve", "--models-dir", str(tmp_path),
         "--port", "0", "--api-key-file", str(keys)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "used twice" in completed.stderr
    assert ALICE not in completed.stderr
    assert BOB not in completed.stderr


@pytest.mark.slow
def test_gemma_behind_a_key(start_server: ServerFactory, gemma_dir: Path) -> None:
    server = start_server(gemma_dir, "--default-model", GEMMA, "--api-key", KEY)
    with server.client() as client:
        assert client.post("/infer", json=INFER).status_code == 401
        assert client.post("/infer", json=INFER, headers=bearer(KEY)).status_code == 200
