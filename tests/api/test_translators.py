"""Each protocol's own decode, framing and errors, in-process: what only one protocol
does (the shared behaviour is ``test_every_protocol.py``'s)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from modeld.types import ChatRequest, InferRequest
from tests.api.conftest import TINY_CHAT, AppFactory

pytestmark = pytest.mark.anyio

HELLO = [{"role": "user", "content": "hello"}]


def _events(text: str) -> list[Any]:
    return [
        orjson.loads(line[6:]) if line != "data: [DONE]" else "[DONE]"
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


async def test_openai_chat_stream_frames(app_factory: AppFactory) -> None:
    body = {
        "model": TINY_CHAT, "messages": HELLO, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    async with app_factory() as app:
        response = await app.http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    finish = events[-3]["choices"][0]
    assert finish["finish_reason"] == "length"
    assert finish["delta"] == {}
    assert {e["id"] for e in events[:-1]} == {events[0]["id"]}
    assert events[0]["id"].startswith("chatcmpl-")
    assert events[0]["object"] == "chat.completion.chunk"


async def test_openai_chat_whole_answer(app_factory: AppFactory) -> None:
    body = {"model": TINY_CHAT, "messages": HELLO, "max_completion_tokens": 3}
    async with app_factory() as app:
        response = await app.http.post("/v1/chat/completions", json=body)
        (request,) = app.manager.requests
    answer = response.json()
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3
    assert isinstance(request, ChatRequest)
    assert request.max_tokens == 3
    assert request.stream is False


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 9}, "n"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": 1}}]}, "tools"),
        ({"max_tokens": 2, "max_completion_tokens": 3}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"response_format": {"type": "yaml"}}, "response_format.type"),
        ({"temperature": 9}, "temperature"),
    ],
)
async def test_openai_refusals_name_openais_parameter(
    app_factory: AppFactory, extra: dict[str, Any], param: str
) -> None:
    async with app_factory() as app:
        response = await app.http.post(
            "/v1/chat/completions", json={"model": TINY_CHAT, "messages": HELLO, **extra}
        )
        assert not app.manager.requests
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


async def test_openai_unknown_route_and_model_in_openais_shape(app_factory: AppFactory) -> None:
    async with app_factory() as app:
        route = await app.http.post("/v1/assistants", json={})
        model = await app.http.get("/v1/models/nothing-here")
    assert route.status_code == 404
    assert route.json()["error"]["type"] == "not_found_error"
    assert "/v1/assistants" in route.json()["error"]["message"]
    assert model.status_code == 404
    assert model.json()["error"]["param"] == "model"


async def test_openai_completion_prompt_and_seed(app_factory: AppFactory) -> None:
    body = {"model": TINY_CHAT, "prompt": ["once"], "max_tokens": 2, "seed": -5, "stop": "x"}
    async with app_factory() as app:
        response = await app.http.post("/v1/completions", json=body)
        (request,) = app.manager.requests
    assert response.json()["object"] == "text_completion"
    assert isinstance(request, InferRequest)
    assert request.prompt == "once"
    assert request.seed is None  # a negative seed is "random"
    assert request.stop == ("x",)


async def test_responses_stream_events_and_echo(app_factory: AppFactory) -> None:
    body = {
        "model": TINY_CHAT, "input": "hi", "instructions": "be brief",
        "max_output_tokens": 3, "temperature": 0.5, "stream": True,
    }  # fmt: skip
    async with app_factory() as app:
        response = await app.http.post("/v1/responses", json=body)
        (request,) = app.manager.requests
    kinds = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-1] == "response.incomplete"  # max_output_tokens reached
    final = _events(response.text)[-1]["response"]
    assert final["max_output_tokens"] == 3
    assert final["temperature"] == 0.5
    assert final["usage"]["output_tokens"] == 3
    assert isinstance(request, ChatRequest)
    assert [m.role for m in request.messages] == ["system", "user"]


async def test_responses_refuse_what_they_cannot_do(app_factory: AppFactory) -> None:
    async with app_factory() as app:
        stored = await app.http.post(
            "/v1/responses", json={"input": "hi", "previous_response_id": "resp_1"}
        )
        too_many = await app.http.post(
            "/v1/responses", json={"input": "hi", "max_output_tokens": 0}
        )
    assert stored.json()["error"]["param"] == "previous_response_id"
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "max_output_tokens"


async def test_ollama_generate_lines_and_names(app_factory: AppFactory) -> None:
    body = {"model": "tiny-chat", "prompt": "hi", "options": {"num_predict": 3, "seed": -1}}
    async with app_factory() as app:
        response = await app.http.post("/api/generate", json=body)
        (request,) = app.manager.requests
    lines = [orjson.loads(line) for line in response.text.splitlines()]
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert all(line["model"] == "tiny-chat" for line in lines)
    assert [line["done"] for line in lines][-1] is True
    assert lines[-1]["done_reason"] == "length"
    assert lines[-1]["eval_count"] == 3
    assert isinstance(request, ChatRequest)  # a model with a template: one user turn
    assert request.model == TINY_CHAT
    assert request.seed is None


async def test_ollama_raw_generate_and_whole_chat(app_factory: AppFactory) -> None:
    async with app_factory() as app:
        raw = await app.http.post(
            "/api/generate",
            json={"model": "tiny-chat:latest", "prompt": "hi", "raw": True, "stream": False},
        )
        chat = await app.http.post(
            "/api/chat",
            json={"model": "tiny-chat", "messages": HELLO, "stream": False,
                  "options": {"num_predict": 2}},
        )  # fmt: skip
        generate, converse = app.manager.requests
    assert isinstance(generate, InferRequest)
    assert raw.json()["done"] is True
    assert isinstance(converse, ChatRequest)
    assert chat.json()["message"]["role"] == "assistant"
    assert chat.json()["eval_count"] == 2


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"model": "tiny-chat", "prompt": "hi", "images": ["aGk="]}, "images"),
        ({"model": "tiny-chat", "prompt": "hi", "options": {"temperature": "hot"}}, "temperature"),
        ({"model": "tiny-chat", "prompt": "hi", "options": {"num_predict": 10**9}}, "num_predict"),
        ({"prompt": "hi"}, "model is required"),
    ],
)
async def test_ollama_refusals_are_its_string_errors(
    app_factory: AppFactory, body: dict[str, Any], needle: str
) -> None:
    async with app_factory() as app:
        response = await app.http.post("/api/generate", json=body)
    assert response.status_code == 400, response.text
    assert set(response.json()) == {"error"}
    assert needle in response.json()["error"]


async def test_ollama_404_names_the_model_as_sent(app_factory: AppFactory) -> None:
    async with app_factory() as app:
        response = await app.http.post(
            "/api/chat", json={"model": "ghost:latest", "messages": HELLO}
        )
        wrong_tag = await app.http.post(
            "/api/chat", json={"model": "tiny-chat:7b", "messages": HELLO}
        )
    assert response.status_code == 404
    assert response.json() == {"error": 'model "ghost:latest" not found'}
    assert wrong_tag.json() == {"error": 'model "tiny-chat:7b" not found'}


async def test_infer_whole_record_and_unknown_field(app_factory: AppFactory) -> None:
    async with app_factory() as app:
        whole = await app.http.post(
            "/infer", json={"model": TINY_CHAT, "prompt": "hi", "max_tokens": 2, "stream": False}
        )
        unknown = await app.http.post("/infer", json={"prompt": "hi", "temprature": 1})
    record = whole.json()
    assert record["done"] is True
    assert record["done_reason"] == "length"
    assert isinstance(record["text"], str)
    assert record["metrics"]["completion_tokens"] == 2
    assert unknown.status_code == 400
    assert unknown.json()["error"]["field"] == "temprature"
