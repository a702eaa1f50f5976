"""Every bad ``POST /infer`` body and every unsafe model id gets its documented error, and
the server keeps serving (the table in ``docs/bad-inputs.md`` names these tests)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.support.http import ServerFactory, http_request, raw_exchange
from tests.support.server import RunningServer

# (id, body, status, error code or None for a 200, field named or None)
InferCase = tuple[str, bytes, int, str | None, str | None]


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


BAD, BAD_ID, NOT_FOUND = "bad_request", "invalid_model_id", "model_not_found"
TOO_LONG = "context_length_exceeded"


def with_prompt(rest: bytes) -> bytes:
    """``{"prompt": "x", <rest>}``"""
    return b'{"prompt": "x", ' + rest + b"}"


INFER_BODIES: list[InferCase] = [
    # malformed JSON and encodings
    ("truncated-json", b"{", 400, BAD, None),
    ("empty-body", b"", 400, BAD, None),
    ("whitespace-body", b"  \n ", 400, BAD, None),
    ("top-level-array", b"[]", 400, BAD, None),
    ("top-level-string", b'"prompt"', 400, BAD, None),
    ("top-level-null", b"null", 400, BAD, None),
    ("trailing-garbage", b'{"prompt": "x"} x', 400, BAD, None),
    ("utf8-bom", b'\xef\xbb\xbf{"prompt": "x"}', 400, BAD, None),
    ("invalid-utf8-body", b"\xff\xfe", 400, BAD, None),
    ("invalid-utf8-in-prompt", b'{"prompt": "\xff\xfe"}', 400, BAD, None),
    ("lone-surrogate", b'{"prompt": "\\ud800"}', 400, BAD, None),
    ("nan-literal", with_prompt(b'"temperature": NaN'), 400, BAD, None),
    ("infinity-literal", with_prompt(b'"temperature": Infinity'), 400, BAD, None),
    ("minus-infinity", with_prompt(b'"temperature": -Infinity'), 400, BAD, None),
    ("number-1e999", with_prompt(b'"temperature": 1e999'), 400, BAD, "temperature"),
    ("deep-nesting-prompt", b'{"prompt": ' + nested(100_000) + b"}", 400, BAD, "prompt"),
    ("deep-nesting-stop", with_prompt(b'"stop": ' + nested(100_000)), 400, BAD, "stop"),
    ("deep-nesting-unknown", with_prompt(b'"x": ' + nested(100_000)), 400, BAD, "x"),
    # duplicate keys: every occurrence is validated, then the last one wins
    ("duplicate-key-both-valid", with_prompt(b'"max_tokens": 5, "max_tokens": 1'), 200, None, None),
    ("duplicate-key-first-bad", with_prompt(b'"top_k": -1, "top_k": 1'), 400, BAD, "top_k"),
    ("duplicate-key-last-bad", with_prompt(b'"top_k": 1, "top_k": -1'), 400, BAD, "top_k"),
    # fields: types and bounds
    ("missing-prompt", b'{"max_tokens": 5}', 400, BAD, "prompt"),
    ("prompt-not-string", b'{"prompt": 5}', 400, BAD, "prompt"),
    ("prompt-over-1e6-chars", b'{"prompt": "' + b"x" * 1_000_001 + b'"}', 400, BAD, "prompt"),
    ("prompt-with-nul", b'{"prompt": "a\\u0000b", "max_tokens": 1}', 200, None, None),
    ("prompt-over-context", b'{"prompt": "' + b"hello " * 400 + b'"}', 400, TOO_LONG, "prompt"),
    # max_tokens past what the context has left is a cap (as in Ollama, llama-server)
    ("prompt-plus-max-tokens", with_prompt(b'"max_tokens": 255'), 200, None, None),
    ("max-tokens-string", with_prompt(b'"max_tokens": "5"'), 400, BAD, "max_tokens"),
    ("max-tokens-float", with_prompt(b'"max_tokens": 5.0'), 400, BAD, "max_tokens"),
    ("max-tokens-bool", with_prompt(b'"max_tokens": true'), 400, BAD, "max_tokens"),
    ("max-tokens-zero", with_prompt(b'"max_tokens": 0'), 400, BAD, "max_tokens"),
    ("max-tokens-negative", with_prompt(b'"max_tokens": -1'), 400, BAD, "max_tokens"),
    ("max-tokens-over-context", with_prompt(b'"max_tokens": 100000'), 200, None, None),
    ("max-tokens-400-digits", with_prompt(b'"max_tokens": ' + b"9" * 400), 400, BAD, "max_tokens"),
    ("temperature-2.5", with_prompt(b'"temperature": 2.5'), 400, BAD, "temperature"),
    ("temperature-negative", with_prompt(b'"temperature": -1'), 400, BAD, "temperature"),
    ("top-p-1.5", with_prompt(b'"top_p": 1.5'), 400, BAD, "top_p"),
    ("top-k-negative", with_prompt(b'"top_k": -1'), 400, BAD, "top_k"),
    ("min-p-negative", with_prompt(b'"min_p": -0.1'), 400, BAD, "min_p"),
    ("repeat-penalty-zero", with_prompt(b'"repeat_penalty": 0'), 400, BAD, "repeat_penalty"),
    ("repeat-penalty-11", with_prompt(b'"repeat_penalty": 11'), 400, BAD, "repeat_penalty"),
    ("seed-2^32", with_prompt(b'"seed": 4294967296'), 400, BAD, "seed"),
    ("seed-2^64", with_prompt(b'"seed": 18446744073709551616'), 400, BAD, "seed"),
    ("seed-negative", with_prompt(b'"seed": -1'), 400, BAD, "seed"),
    ("stop-not-string", with_prompt(b'"stop": ["a", 1]'), 400, BAD, "stop"),
    ("stop-empty-string", with_prompt(b'"stop": [""]'), 400, BAD, "stop"),
    ("stop-257-chars", with_prompt(b'"stop": ["' + b"s" * 257 + b'"]'), 400, BAD, "stop"),
    ("stop-17-strings", with_prompt(b'"stop": [' + b'"s",' * 16 + b'"s"]'), 400, BAD, "stop"),
    ("stream-string", with_prompt(b'"stream": "yes"'), 400, BAD, "stream"),
    ("unknown-field-n-discard", with_prompt(b'"n_discard": -5'), 400, BAD, "n_discard"),
    ("unknown-field-logit-bias", with_prompt(b'"logit_bias": {"1": 100}'), 400, BAD, "logit_bias"),
    # model ids in the body
    ("model-unknown", with_prompt(b'"model": "nope.gguf"'), 404, NOT_FOUND, None),
    ("model-empty", with_prompt(b'"model": ""'), 400, BAD, "model"),
    ("model-not-string", with_prompt(b'"model": 5'), 400, BAD, "model"),
    ("model-dotdot", with_prompt(b'"model": "../etc/passwd"'), 400, BAD_ID, "model"),
    ("model-dotdot-gguf", with_prompt(b'"model": "..gguf"'), 400, BAD_ID, "model"),
    ("model-absolute", with_prompt(b'"model": "/abs/x.gguf"'), 400, BAD_ID, "model"),
    ("model-backslash", with_prompt(b'"model": "..\\\\x.gguf"'), 400, BAD_ID, "model"),
    ("model-nul", with_prompt(b'"model": "a\\u0000b.gguf"'), 400, BAD_ID, "model"),
    # A name no file has is a model that is not here (404); only NUL, '/' and '..' are 400.
    ("model-not-gguf", with_prompt(b'"model": "notes.txt"'), 404, NOT_FOUND, "model"),
    ("model-non-nfc", with_prompt(b'"model": "e\\u0301.gguf"'), 404, NOT_FOUND, "model"),
    ("model-256-chars", with_prompt(b'"model": "' + b"m" * 251 + b'.gguf"'), 400, BAD, "model"),
    ("model-symlink-outside", with_prompt(b'"model": "escape.gguf"'), 400, BAD_ID, "model"),
    ("model-directory", with_prompt(b'"model": "dir.gguf"'), 404, NOT_FOUND, None),
    ("model-fifo", with_prompt(b'"model": "fifo.gguf"'), 404, NOT_FOUND, None),
    ("model-dangling-symlink", with_prompt(b'"model": "dangling.gguf"'), 404, NOT_FOUND, None),
]  # fmt: skip


def populate_hostile_entries(directory: Path, outside: Path) -> None:
    """Entries a models dir may hold that must never be opened as models."""
    (directory / "dir.gguf").mkdir()
    os.mkfifo(directory / "fifo.gguf")
    secret = outside / "secret.gguf"
    secret.write_bytes(b"GGUF not yours")
    (directory / "escape.gguf").symlink_to(secret)
    (directory / "dangling.gguf").symlink_to(outside / "missing.gguf")
    (directory / "notes.txt").write_text("not a model")


@pytest.fixture(scope="module")
def hostile_models_dir(tmp_path_factory: pytest.TempPathFactory, module_models_dir: Path) -> Path:
    populate_hostile_entries(module_models_dir, tmp_path_factory.mktemp("outside"))
    return module_models_dir


@pytest.fixture(scope="module")
def server(hostile_models_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(hostile_models_dir, "--default-model", "tiny-a.gguf")


def assert_error(response: httpx.Response, status: int, code: str, field: str | None) -> None:
    assert response.status_code == status, response.text[:500]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    if field is not None:
        assert error.get("field") == field, error


@pytest.mark.parametrize(
    ("body", "status", "code", "field"),
    [pytest.param(*case[1:], id=case[0]) for case in INFER_BODIES],
)
def test_infer_body(
    client: httpx.Client, body: bytes, status: int, code: str | None, field: str | None
) -> None:
    response = client.post("/infer", content=body, headers={"content-type": "application/json"})
    if code is None:
        assert response.status_code == status, response.text[:500]
        assert response.text.splitlines()[-1].startswith('{"done":true')
    else:
        assert_error(response, status, code, field)
    assert client.get("/healthz").status_code == 200


UNSAFE_PATH_IDS = [
    # (id, raw path segment, status, code); the same for load and unload
    ("percent-dotdot", "%2e%2e", 400, "invalid_model_id"),
    ("percent-dotdot-upper", "%2E%2E", 400, "invalid_model_id"),
    ("percent-dot", "%2e", 400, "invalid_model_id"),
    ("percent-nul", "a%00b.gguf", 400, "invalid_model_id"),
    ("percent-slash-traversal", "..%2f..%2fetc%2fpasswd", 404, "not_found"),
    ("percent-backslash", "..%5cx.gguf", 400, "invalid_model_id"),
    ("overlong-utf8-dot", "%C0%AE%C0%AE", 400, "invalid_model_id"),
    ("not-gguf", "notes.txt", 400, "invalid_model_id"),
    ("unknown", "nope.gguf", 404, "model_not_found"),
    ("directory", "dir.gguf", 404, "model_not_found"),
    ("fifo", "fifo.gguf", 404, "model_not_found"),
]


def path_cases(method: str) -> list[object]:
    return [
        pytest.param(method, segment, status, code, id=name)
        for name, segment, status, code in UNSAFE_PATH_IDS
    ]


TEMPLATES = {"POST": "/models/{}/load", "DELETE": "/models/{}/instance"}


@pytest.mark.parametrize(("method", "segment", "status", "code"), path_cases("POST"))
def test_unsafe_model_id_in_load_path(
    server: RunningServer, method: str, segment: str, status: int, code: str
) -> None:
    assert_path_refused(server, method, segment, status, code)


@pytest.mark.parametrize(("method", "segment", "status", "code"), path_cases("DELETE"))
def test_unsafe_model_id_in_unload_path(
    server: RunningServer, method: str, segment: str, status: int, code: str
) -> None:
    assert_path_refused(server, method, segment, status, code)


def assert_path_refused(
    server: RunningServer, method: str, segment: str, status: int, code: str
) -> None:
    # Raw bytes: httpx would normalise ``%2e%2e`` away before it reached the server.
    response = raw_exchange(server, http_request(method, TEMPLATES[method].format(segment)))
    assert (response.status, response.error_code()) == (status, code), response.body
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]  # type: ignore[index]
    with httpx.Client(base_url=server.base_url) as fresh:
        assert fresh.get("/healthz").status_code == 200


def test_symlink_out_of_the_dir_is_refused_by_load(server: RunningServer) -> None:
    response = raw_exchange(server, http_request("POST", "/models/escape.gguf/load"))
    assert (response.status, response.error_code()) == (400, "invalid_model_id")


def test_body_over_the_default_limit_is_refused(client: httpx.Client) -> None:
    response = client.post("/infer", content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}')
    assert_error(response, 413, "payload_too_large", None)


def test_duplicate_keys_last_one_wins(client: httpx.Client) -> None:
    body = b'{"prompt": "x", "stream": false, "max_tokens": 5, "max_tokens": 2}'
    result = client.post("/infer", content=body).json()
    assert result["metrics"]["completion_tokens"] == 2


def test_unload_of_a_model_that_is_not_loaded(client: httpx.Client) -> None:
    response = client.delete("/models/tiny-a.gguf/instance")
    if response.status_code == 200:  # an earlier test loaded it: now it is gone
        response = client.delete("/models/tiny-a.gguf/instance")
    assert_error(response, 404, "model_not_found", None)


def test_load_body_is_validated(client: httpx.Client) -> None:
    unknown = client.post("/models/tiny-a.gguf/load", content=b'{"pin": true, "x": 1}')
    assert_error(unknown, 400, "bad_request", "x")
    wrong_type = client.post("/models/tiny-a.gguf/load", content=b'{"pin": "yes"}')
    assert_error(wrong_type, 400, "bad_request", "pin")
    not_json = client.post("/models/tiny-a.gguf/load", content=b"{")
    assert_error(not_json, 400, "bad_request", None)
