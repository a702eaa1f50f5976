"""The same behaviour, asserted once over every generation protocol: the queue time is
recorded, the prompt is logged at debug, an early end gives the protocol's own terminal
event (streamed) or status (whole), and 401, 404 and 429 come in the protocol's shape.

Each :class:`Wire` only says how its protocol spells a request and reads an answer;
the assertions are the same for all, so a protocol added to ``PROTOCOLS`` gets them all.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from modeld.types import DoneReason, InferRequest
from tests.api.conftest import KEY, TINY_CHAT, AppFactory, LogRecords

pytestmark = pytest.mark.anyio

PROMPT = "the quick brown fox"
Body = Callable[[str, bool], dict[str, Any]]


def _sse_events(text: str) -> list[dict[str, Any]]:
    """The JSON of each ``data:`` line (``[DONE]`` as ``{"[DONE]": True}``)."""
    events: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.startswith("data: "):
            data = line.removeprefix("data: ")
            events.append({"[DONE]": True} if data == "[DONE]" else orjson.loads(data))
    return events


def _ndjson(text: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in text.splitlines() if line.strip()]


@dataclass(frozen=True)
class Wire:
    name: str
    path: str
    body: Body
    stream_lines: Callable[[str], list[dict[str, Any]]]
    finished: Callable[[list[dict[str, Any]]], bool]  # the stream ended complete
    ended_with_error: Callable[[list[dict[str, Any]]], str]  # the early end's error text
    error_code: Callable[[dict[str, Any]], str | None]  # modeld's code, where it is shown
    error_text: Callable[[dict[str, Any]], str]
    error_param: Callable[[dict[str, Any]], str | None] = lambda body: None  # its param
    early_end_status: int = 503  # an evicted generation, answered whole


def _openai_error(body: dict[str, Any]) -> str:
    return str(body["error"]["message"])


def _modeld_code(body: dict[str, Any]) -> str | None:
    return str(body["error"]["code"])


def _openai_param(body: dict[str, Any]) -> str | None:
    assert set(body["error"]) >= {"message", "type", "param", "code"}, body  # OpenAI's shape
    param: str | None = body["error"]["param"]
    return param


def _prompt_body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPT, "max_tokens": 64, "stream": stream}


def _chat_body(model: str, stream: bool) -> dict[str, Any]:
    messages = [{"role": "user", "content": PROMPT}]
    return {"model": model, "messages": messages, "max_tokens": 64, "stream": stream}


def _responses_body(model: str, stream: bool) -> dict[str, Any]:
    return {"model": model, "input": PROMPT, "max_output_tokens": 64, "stream": stream}


def _ollama_generate_body(model: str, stream: bool) -> dict[str, Any]:
    name = model.removesuffix(".gguf")  # Ollama's names: the stem
    return {"model": name, "prompt": PROMPT, "stream": stream, "options": {"num_predict": 64}}


def _ollama_chat_body(model: str, stream: bool) -> dict[str, Any]:
    name = model.removesuffix(".gguf") + ":latest"
    messages = [{"role": "user", "content": PROMPT}]
    return {"model": name, "messages": messages, "stream": stream, "options": {"num_predict": 64}}


PROTOCOLS = [
    Wire(
        "infer",
        "/infer",
        _prompt_body,
        _ndjson,
        lambda lines: lines[-1]["done"] is True and lines[-1]["done_reason"] in ("stop", "length"),
        lambda lines: str(lines[-1]["done_reason"]),
        _modeld_code,
        lambda body: str(body["error"]["message"]),
        lambda body: body["error"].get("field"),
        early_end_status=200,  # NDJSON's whole answer is its terminal record
    ),
    Wire(
        "openai-chat",
        "/v1/chat/completions",
        _chat_body,
        _sse_events,
        lambda events: events[-1] == {"[DONE]": True},
        lambda events: str(events[-1]["error"]["code"]),
        _modeld_code,
        _openai_error,
        _openai_param,
    ),
    Wire(
        "openai-completions",
        "/v1/completions",
        _prompt_body,
        _sse_events,
        lambda events: events[-1] == {"[DONE]": True},
        lambda events: str(events[-1]["error"]["code"]),
        _modeld_code,
        _openai_error,
        _openai_param,
    ),
    Wire(
        "openai-responses",
        "/v1/responses",
        _responses_body,
        _sse_events,
        lambda events: events[-1]["type"] in ("response.completed", "response.incomplete"),
        lambda events: str(events[-1]["code"]) if events[-1]["type"] == "error" else "",
        _modeld_code,
        _openai_error,
        _openai_param,
    ),
    Wire(
        "ollama-generate",
        "/api/generate",
        _ollama_generate_body,
        _ndjson,
        lambda lines: lines[-1].get("done") is True and "error" not in lines[-1],
        lambda lines: str(lines[-1].get("error", "")),
        lambda body: None,  # Ollama's errors are a string
        lambda body: str(body["error"]),
    ),
    Wire(
        "ollama-chat",
        "/api/chat",
        _ollama_chat_body,
        _ndjson,
        lambda lines: lines[-1].get("done") is True and "error" not in lines[-1],
        lambda lines: str(lines[-1].get("error", "")),
        lambda body: None,
        lambda body: str(body["error"]),
    ),
]


@pytest.fixture(params=PROTOCOLS, ids=lambda wire: wire.name)
def wire(request: pytest.FixtureRequest) -> Wire:
    chosen: Wire = request.param
    return chosen


def _access_line(records: LogRecords) -> dict[str, Any]:
    (line,) = [r for r in records if r["message"] == "request"]
    return line


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_queue_time_and_prompt_are_recorded(
    app_factory: AppFactory, log_records: LogRecords, wire: Wire, stream: bool
) -> None:
    async with app_factory() as app:
        response = await app.http.post(
            wire.path, json=wire.body(TINY_CHAT, stream), headers={"X-Log-Level": "debug"}
        )
    assert response.status_code == 200, response.text
    if stream:
        assert wire.finished(wire.stream_lines(response.text)), response.text
    access = _access_line(log_records)
    assert access["status"] == 200
    assert access["model"] == TINY_CHAT
    assert isinstance(access["queue_ms"], float)
    assert access["queue_ms"] >= 0.0
    prompts = [r for r in log_records if r["message"] == "prompt"]
    assert len(prompts) == 1
    assert PROMPT in str(prompts[0]["prompt"])


async def test_without_debug_no_prompt_is_logged(
    app_factory: AppFactory, log_records: LogRecords, wire: Wire
) -> None:
    async with app_factory() as app:
        response = await app.http.post(wire.path, json=wire.body(TINY_CHAT, False))
    assert response.status_code == 200, response.text
    assert not [r for r in log_records if r["message"] in ("prompt", "completion")]
    assert not any(PROMPT in str(r) for r in log_records)


async def test_an_early_end_streamed_ends_with_the_protocols_error(
    app_factory: AppFactory, wire: Wire
) -> None:
    async with app_factory() as app:
        app.manager.end_next = DoneReason.EVICTED
        response = await app.http.post(wire.path, json=wire.body(TINY_CHAT, True))
    assert response.status_code == 200  # the stream had started
    lines = wire.stream_lines(response.text)
    assert not wire.finished(lines), response.text
    assert "evicted" in wire.ended_with_error(lines), response.text


async def test_an_early_end_answered_whole_is_its_status(
    app_factory: AppFactory, wire: Wire
) -> None:
    async with app_factory() as app:
        app.manager.end_next = DoneReason.EVICTED
        response = await app.http.post(wire.path, json=wire.body(TINY_CHAT, False))
    assert response.status_code == wire.early_end_status, response.text
    body = response.json()
    if wire.early_end_status == 200:
        assert body["done_reason"] == "evicted"
    else:
        assert "ended early (evicted)" in wire.error_text(body)
        assert wire.error_code(body) in (None, "evicted")


@pytest.mark.parametrize("name", ["no-such-model.gguf", "no-such-model"])
async def test_an_unknown_model_is_404_in_the_protocols_shape(
    app_factory: AppFactory, wire: Wire, name: str
) -> None:
    async with app_factory() as app:
        response = await app.http.post(wire.path, json=wire.body(name, False))
    assert response.status_code == 404, response.text
    body = response.json()
    assert "no-such-model" in wire.error_text(body)
    assert wire.error_code(body) in (None, "model_not_found")
    assert wire.error_param(body) in (None, "model")
    assert response.headers["x-request-id"]


async def test_a_name_with_a_separator_stays_a_400(app_factory: AppFactory, wire: Wire) -> None:
    async with app_factory() as app:
        response = await app.http.post(wire.path, json=wire.body("../etc/passwd", False))
    if wire.error_code(response.json()) is None:  # Ollama: no such name, a 404 as Ollama
        assert response.status_code == 404, response.text
    else:
        assert response.status_code == 400, response.text
        assert wire.error_code(response.json()) == "invalid_model_id"


async def test_a_missing_key_is_401_in_the_protocols_shape(
    app_factory: AppFactory, wire: Wire
) -> None:
    async with app_factory(api_key=KEY) as app:
        refused = await app.http.post(wire.path, json=wire.body(TINY_CHAT, False))
        allowed = await app.http.post(
            wire.path, json=wire.body(TINY_CHAT, False), headers={"Authorization": f"Bearer {KEY}"}
        )
    assert refused.status_code == 401, refused.text
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert "API key" in wire.error_text(refused.json())
    assert wire.error_code(refused.json()) in (None, "unauthorized")
    assert wire.error_param(refused.json()) is None  # OpenAI's shape on /v1 (type, param)
    assert allowed.status_code == 200, allowed.text


async def test_a_full_queue_is_429_in_the_protocols_shape(
    app_factory: AppFactory, wire: Wire
) -> None:
    async with app_factory(max_queue_depth="0") as app:
        holding = InferRequest(prompt=PROMPT, model=TINY_CHAT, max_tokens=200)
        async with app.manager.stream(holding) as running:
            response = await app.http.post(wire.path, json=wire.body(TINY_CHAT, False))
            running.cancel()
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    assert wire.error_code(response.json()) in (None, "queue_full")
    assert wire.error_text(response.json())


@pytest.mark.parametrize(
    "wire", [w for w in PROTOCOLS if w.path.startswith("/v1")], ids=lambda w: w.name
)
async def test_a_cancelled_stream_ends_with_a_server_error_event(
    app_factory: AppFactory, wire: Wire
) -> None:
    """docs/compat.md: a stream modeld ends early (a ``DELETE /requests/{id}`` too) ends
    with an ``error`` whose type is ``server_error``, whatever status an unstreamed answer
    would have had (499 for a cancel)."""
    async with app_factory() as app:
        app.manager.end_next = DoneReason.CANCELLED
        response = await app.http.post(wire.path, json=wire.body(TINY_CHAT, True))
    last = wire.stream_lines(response.text)[-1]
    assert last["error"]["type"] == "server_error", last
    assert last["error"]["code"] == "cancelled"
