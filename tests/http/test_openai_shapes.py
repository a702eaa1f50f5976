"""modeld's OpenAI answers validated against OpenAI's published shapes: the ``openai``
package's types are generated from OpenAI's OpenAPI specification, and validating the raw
JSON with them (not the client's lenient parse) fails on a missing required field, a wrong
literal (``object``, ``type``, ``finish_reason``, ``status``) or a wrongly shaped nested
value. Every answer carries the newer fields: ``n`` > 1, logprobs, usage details, a
Responses stream's every event."""

from __future__ import annotations

import shutil
import typing
from pathlib import Path
from typing import Any

import pytest
from openai.types import Completion, CreateEmbeddingResponse, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import BaseModel, TypeAdapter, ValidationError

from tests.support.http import ServerFactory
from tests.support.openai_clients import TINY_CHAT, sse_data, write_chat_models
from tests.support.server import RunningServer

HELLO = [{"role": "user", "content": "hello world"}]
TINY = "tiny-a.gguf"
SAMPLED: dict[str, Any] = {"temperature": 0.9, "seed": 11}
STREAM_EVENT: TypeAdapter[Any] = TypeAdapter(typing.get_args(ResponseStreamEvent)[0])


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
    module_server_factory: ServerFactory,
) -> RunningServer:  # fmt: skip
    directory = write_chat_models(tmp_path_factory.mktemp("openai-shapes"))
    shutil.copyfile(tiny_model_dir / TINY, directory / TINY)
    return module_server_factory(directory)


def _post(server: RunningServer, path: str, body: dict[str, Any]) -> Any:
    with server.client() as http:
        answer = http.post(path, json=body)
    assert answer.status_code == 200, answer.text
    return answer.json() if not body.get("stream") else sse_data(answer.text)


def _valid(model: type[BaseModel], payload: Any) -> BaseModel:
    return model.model_validate(payload)


def test_the_shape_check_catches_a_wrong_answer() -> None:
    """The check can fail: a chat answer missing ``created`` or with another ``object``."""
    good = {"id": "x", "object": "chat.completion", "created": 1, "model": "m", "choices": []}
    _valid(ChatCompletion, good)
    for bad in ({k: v for k, v in good.items() if k != "created"}, {**good, "object": "x"}):
        with pytest.raises(ValidationError):
            _valid(ChatCompletion, bad)


def test_chat_whole_with_choices_and_logprobs(server: RunningServer) -> None:
    body = {"model": TINY_CHAT, "messages": HELLO, "n": 2, "max_tokens": 6,
            "logprobs": True, "top_logprobs": 2, **SAMPLED}  # fmt: skip
    answer = _valid(ChatCompletion, _post(server, "/v1/chat/completions", body))
    assert isinstance(answer, ChatCompletion)
    assert [choice.index for choice in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.logprobs is not None
        assert choice.logprobs.content
        assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    assert answer.usage is not None
    assert answer.usage.prompt_tokens_details is not None


def test_chat_stream_every_chunk(server: RunningServer) -> None:
    body = {"model": TINY_CHAT, "messages": HELLO, "n": 2, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 1,
            **SAMPLED}  # fmt: skip
    events = _post(server, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = [_valid(ChatCompletionChunk, data) for data in events[:-1]]
    assert {choice.index for chunk in chunks for choice in chunk.choices} == {0, 1}  # type: ignore[attr-defined]
    assert chunks[-1].usage is not None  # type: ignore[attr-defined]


def test_completions_whole_and_streamed(server: RunningServer) -> None:
    body = {"model": TINY, "prompt": "The quick brown fox", "n": 2, "max_tokens": 6,
            "logprobs": 2, **SAMPLED}  # fmt: skip
    whole = _valid(Completion, _post(server, "/v1/completions", body))
    assert isinstance(whole, Completion)
    assert all(choice.logprobs is not None for choice in whole.choices)
    events = _post(server, "/v1/completions", {**body, "stream": True})
    assert events[-1] == "[DONE]"
    for data in events[:-1]:
        # OpenAI streams finish_reason null until a choice ends, as modeld does; the
        # specification's Completion (written for whole answers) has no null there
        for choice in data["choices"]:
            choice["finish_reason"] = choice["finish_reason"] or "stop"
        _valid(Completion, data)


def test_responses_whole_and_every_stream_event(server: RunningServer) -> None:
    body = {"model": TINY_CHAT, "input": "hi", "max_output_tokens": 4,
            "include": ["message.output_text.logprobs"], "top_logprobs": 2, **SAMPLED}  # fmt: skip
    whole = _valid(Response, _post(server, "/v1/responses", body))
    assert isinstance(whole, Response)
    assert whole.status in ("completed", "incomplete")
    events = _post(server, "/v1/responses", {**body, "stream": True})
    types = [STREAM_EVENT.validate_python(data).type for data in events]
    assert types[0] == "response.created"
    assert types[-1] in ("response.completed", "response.incomplete")


def test_embeddings_and_models(server: RunningServer) -> None:
    body = {"model": TINY, "input": ["one", "two"], "encoding_format": "float"}
    _valid(CreateEmbeddingResponse, _post(server, "/v1/embeddings", body))
    with server.client() as http:
        listed = http.get("/v1/models").json()
    assert listed["object"] == "list"
    assert {_valid(Model, entry).id for entry in listed["data"]} >= {TINY, TINY_CHAT}  # type: ignore[attr-defined]
