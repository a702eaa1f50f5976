"""Every bound on a JSON schema, through every protocol that takes one, against a real
server: each is a 400 naming the protocol's field and the bound, answered before any
grammar is built, and the server goes on serving (docs/bad-inputs.md names these)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from modeld.grammar import DEFAULT_LIMITS as LIMITS
from modeld.types import LoopKind
from tests.support.server import RunningServer, start_modeld
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

MODEL = "tiny-chat.gguf"
HELLO = [{"role": "user", "content": "hello"}]


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def _string(**bounds: object) -> dict[str, Any]:
    return {"type": "string", **bounds}


def _many(keyword: str, count: int) -> dict[str, Any]:
    return {keyword: [{"const": i} for i in range(count)]}


def _open_object(**bounds: object) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": True, **bounds}


def _long_strings() -> dict[str, Any]:
    """Every bound holds; together they do not: the converter's own budget stops it."""
    longest = LIMITS.max_repetition
    properties = {f"p{i}": _string(maxLength=longest - i) for i in range(LIMITS.max_properties)}
    return {"type": "object", "properties": properties}


REPEAT, PROPS = LIMITS.max_repetition, LIMITS.max_properties
ENUM, BRANCHES = LIMITS.max_enum_values, LIMITS.max_branches
# (id, schema, words the message must hold)
BOUNDS: list[tuple[str, dict[str, Any], str]] = [
    ("maxLength-1e9", _string(maxLength=10**9), f"maxLength 1000000000 is over the {REPEAT} bound"),
    ("minLength", _string(minLength=10**7), "minLength 10000000 is over"),
    ("maxItems-1e7", {"type": "array", "maxItems": 10**7}, "maxItems 10000000 is over"),
    ("minItems-1e6-no-items", {"type": "array", "minItems": 10**6}, "minItems 1000000 is over"),
    ("maxProperties", _open_object(maxProperties=10**6), "maxProperties 1000000 is over"),
    ("minProperties", _open_object(minProperties=10**6), "minProperties 1000000 is over"),
    ("depth", _nested(LIMITS.max_depth + 1), f"nested over {LIMITS.max_depth} levels"),
    ("flat-properties", {"properties": {f"p{i}": {} for i in range(PROPS + 1)}},
     f"{PROPS + 1} properties is over the {PROPS} bound"),
    ("enum-values", {"enum": list(range(ENUM + 1))}, f"enum of {ENUM + 1} values is over"),
    ("anyOf-branches", _many("anyOf", BRANCHES + 1), f"anyOf with {BRANCHES + 1} schemas"),
    ("oneOf-branches", _many("oneOf", BRANCHES + 1), f"oneOf with {BRANCHES + 1} schemas"),
    ("pattern-length", _string(pattern="a" * (LIMITS.max_pattern_chars + 1)),
     f"pattern of {LIMITS.max_pattern_chars + 1} characters is over"),
    ("pattern-repetition", _string(pattern="^a{1000000}$"), f"repeats over the {REPEAT} bound"),
    ("pattern-nesting", _string(pattern="(" * 20 + "a" + ")" * 20), "groups nest over"),
    ("schema-size", {"description": "x" * LIMITS.max_schema_bytes},
     f"over the {LIMITS.max_schema_bytes} bound"),
    ("expansion-budget", _long_strings(), f"expand past {LIMITS.max_expanded_bytes} bytes"),
    ("unenforceable-not", {"not": {"type": "string"}}, "cannot be enforced: keyword 'not'"),
]  # fmt: skip


def _chat(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return "/v1/chat/completions", {"model": MODEL, "messages": HELLO, "response_format": format_}


def _completions(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    format_ = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    return "/v1/completions", {"model": MODEL, "prompt": "hi", "response_format": format_}


def _responses(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    format_ = {"type": "json_schema", "name": "x", "schema": schema}
    return "/v1/responses", {"model": MODEL, "input": "hi", "text": {"format": format_}}


def _infer(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "/infer", {"model": MODEL, "prompt": "hi", "format": schema, "stream": False}


def _generate(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "/api/generate", {"model": MODEL, "prompt": "hi", "format": schema, "stream": False}


def _ollama_chat(schema: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "/api/chat", {"model": MODEL, "messages": HELLO, "format": schema, "stream": False}


# (id, request maker, the field its errors name; None: Ollama's errors are bare strings)
PROTOCOLS: list[tuple[str, Callable[[dict[str, Any]], tuple[str, dict[str, Any]]], str | None]] = [
    ("infer", _infer, "format"),
    ("v1-chat", _chat, "response_format"),
    ("v1-completions", _completions, "response_format"),
    ("v1-responses", _responses, "text.format"),
    ("api-generate", _generate, None),
    ("api-chat", _ollama_chat, None),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    models = tmp_path_factory.mktemp("schema-models")
    write_tiny_gguf(models / MODEL, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    logs = tmp_path_factory.mktemp("schema-logs")
    running = start_modeld(models, logs, "--threads", "1", "--n-ctx", "256",
                           "--token-loop", str(LoopKind.C))  # fmt: skip
    yield running
    running.stop()


def _error(answer: dict[str, Any]) -> tuple[str, str | None]:
    error = answer["error"]
    if isinstance(error, str):
        return error, None
    return str(error["message"]), error.get("field") or error.get("param")


@pytest.mark.parametrize(("protocol", "make", "field"), PROTOCOLS, ids=[p[0] for p in PROTOCOLS])
@pytest.mark.parametrize(("case", "schema", "words"), BOUNDS, ids=[b[0] for b in BOUNDS])
def test_a_schema_over_a_bound_is_a_400_naming_the_field_and_the_bound(
    server: RunningServer,
    protocol: str,
    make: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]],
    field: str | None,
    case: str,
    schema: dict[str, Any],
    words: str,
) -> None:
    path, body = make(schema)
    with server.client() as http:
        answer = http.post(path, json=body)
        assert answer.status_code == 400, answer.text
        message, named = _error(answer.json())
        assert words in message, message
        if field is not None:
            assert named == field
        assert http.get("/healthz").status_code == 200


def _text(path: str, answer: dict[str, Any]) -> str:
    """The generated text, wherever the protocol puts it."""
    if path == "/infer":
        return str(answer["text"])
    if path == "/v1/chat/completions":
        return str(answer["choices"][0]["message"]["content"])
    if path == "/v1/completions":
        return str(answer["choices"][0]["text"])
    if path == "/v1/responses":
        return str(answer["output"][0]["content"][0]["text"])
    if path == "/api/generate":
        return str(answer["response"])
    return str(answer["message"]["content"])


# minItems without a schema for the items is enforced too (it once answered 200, unbounded)
ENFORCED = {"type": "array", "items": {"enum": [7, "x"]}, "minItems": 3, "maxItems": 4}
ENFORCED_BARE = {"type": "array", "minItems": 2, "maxItems": 2, "prefixItems": [{"const": 1}]}


@pytest.mark.parametrize("schema", [ENFORCED, ENFORCED_BARE], ids=["items", "prefix-then-any"])
@pytest.mark.parametrize(("protocol", "make", "field"), PROTOCOLS, ids=[p[0] for p in PROTOCOLS])
def test_a_schema_within_the_bounds_is_enforced_on_every_protocol(
    server: RunningServer,
    protocol: str,
    make: Callable[[dict[str, Any]], tuple[str, dict[str, Any]]],
    field: str | None,
    schema: dict[str, Any],
) -> None:
    path, body = make(schema)
    limit = {"max_tokens": 200, "temperature": 0}
    if path.startswith("/api/"):
        body = {**body, "options": {"num_predict": 200, "temperature": 0}}
    elif path == "/v1/responses":
        body = {**body, "max_output_tokens": 200, "temperature": 0}
    else:
        body = {**body, **limit}
    with server.client() as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 200, (path, answer.text)
    document = json.loads(_text(path, answer.json()))
    assert isinstance(document, list)
    low, high = schema["minItems"], schema["maxItems"]
    assert low <= len(document) <= high, document
    if "items" in schema:
        assert set(document) <= {7, "x"}
    else:
        assert document[0] == 1
