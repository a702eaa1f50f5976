"""The OpenAI-compatible API driven by the real ``openai`` client (3.51) against a real
``modeld serve``, on tiny models: one written with a chat template, one without."""

from __future__ import annotations

import base64
import json
import math
import shutil
from pathlib import Path

import openai
import pytest

from tests.support.http import ServerFactory
from tests.support.openai_clients import TINY_CHAT, answered, openai_client, sse_data
from tests.support.server import RunningServer
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

HELLO = [{"role": "user", "content": "hello world"}]
CONFIG = """
[models."tiny-chat.gguf"]
aliases = ["tiny-chat", "org/tiny-chat:latest"]

[models."tiny-b.gguf"]
aliases = ["tiny-b"]
chat_template = "chatml"
temperature = 0.0
max_tokens = 5
"""


@pytest.fixture(scope="module")
def openai_models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    directory = tmp_path_factory.mktemp("openai-models")
    write_tiny_gguf(directory / TINY_CHAT, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    for name in ("tiny-a.gguf", "tiny-b.gguf"):
        shutil.copyfile(tiny_model_dir / name, directory / name)
    (directory / "modeld.toml").write_text(CONFIG)
    return directory


@pytest.fixture(scope="module")
def server(openai_models_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        openai_models_dir, "--config", str(openai_models_dir / "modeld.toml")
    )


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai_client(server)


# ------------------------------------------------------------------------------ models


def test_models_lists_every_file_and_alias(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {
        "tiny-a.gguf", "tiny-b.gguf", TINY_CHAT, "tiny-chat", "org/tiny-chat:latest", "tiny-b",
    }  # fmt: skip
    assert {m.owned_by for m in models.values()} == {"modeld"}
    assert models["tiny-chat"].created == models[TINY_CHAT].created > 0
    assert client.models.retrieve("org/tiny-chat:latest").id == "org/tiny-chat:latest"
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.code == "model_not_found"


# ------------------------------------------------------------------------------ chat


def test_chat_answers_in_openai_shape(client: openai.OpenAI, server: RunningServer) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-chat", messages=HELLO, max_completion_tokens=12, temperature=0
    )
    completion = raw.parse()
    assert completion.id == "chatcmpl-" + raw.headers["x-request-id"]
    assert completion.model == TINY_CHAT  # the canonical id, whatever name was used
    assert completion.object == "chat.completion"
    (choice,) = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert choice.finish_reason == "length"  # the tiny models never sample their EOS
    usage = completion.usage
    assert usage is not None
    assert usage.completion_tokens == 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 0


def test_a_continued_chat_reports_its_reused_prefix_as_cached_tokens(
    client: openai.OpenAI,
) -> None:
    """The second turn resends the first: prompt reuse evaluates only what is new, and
    ``usage.prompt_tokens_details.cached_tokens`` says how much was not."""
    first = client.chat.completions.create(
        model="tiny-b", messages=HELLO, max_completion_tokens=8, temperature=0
    )
    answer = first.choices[0].message.content or ""
    turn = [*HELLO, {"role": "assistant", "content": answer}, {"role": "user", "content": "More"}]
    second = client.chat.completions.create(
        model="tiny-b", messages=turn, max_completion_tokens=8, temperature=0
    )
    assert first.usage is not None
    assert second.usage is not None
    assert first.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details is not None
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


def test_stream_equals_non_stream_under_greedy(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=24, temperature=0, seed=1
    )
    stream = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=24, temperature=0, seed=1, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finish] == ["length"]
    assert finish[0].choices[0].delta.content is None  # a separate chunk, empty delta
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 24
    assert usage_chunk.usage == whole.usage
    assert all(c.id == chunks[0].id for c in chunks)


def test_the_sse_framing_on_the_wire(server: RunningServer) -> None:
    body = {
        "model": TINY_CHAT, "messages": HELLO, "max_tokens": 4, "stream": True,
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    with server.client() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    events = sse_data(response.text)
    assert events[-1] == "[DONE]"
    assert events.count("[DONE]") == 1
    chunks = [e for e in events if isinstance(e, dict)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-2]["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "length",
    }  # fmt: skip
    assert chunks[-1]["choices"] == []
    assert all(c["usage"] is None for c in chunks[:-1])


def test_no_usage_chunk_unless_asked(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=3, stream=True)
    )
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


def test_one_bos_whatever_the_template_writes(client: openai.OpenAI, server: RunningServer) -> None:
    """The tiny template writes ``<s>`` (its BOS) itself: the chat equals /infer on the
    rendered text tokenized with the vocabulary's own BOS in place of the written one,
    token for token; with a second BOS it would read one more prompt token."""
    import jinja2.sandbox

    rendered = (
        jinja2.sandbox.ImmutableSandboxedEnvironment()
        .from_string(TINY_CHAT_TEMPLATE)
        .render(messages=HELLO, add_generation_prompt=True, bos_token="<s>", raise_exception=None)
    )
    assert rendered.startswith("<s>")
    chat = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=16, temperature=0
    )
    with server.client() as http:
        infer = http.post(
            "/infer",
            json={"model": TINY_CHAT, "prompt": rendered.removeprefix("<s>"), "max_tokens": 16,
                  "temperature": 0, "stream": False},
        ).json()  # fmt: skip
        doubled = http.post(
            "/infer",
            json={"model": TINY_CHAT, "prompt": rendered, "max_tokens": 1, "stream": False},
        ).json()
    assert chat.choices[0].message.content == infer["text"]
    assert chat.usage is not None
    assert chat.usage.prompt_tokens == infer["metrics"]["prompt_tokens"]
    assert doubled["metrics"]["prompt_tokens"] == chat.usage.prompt_tokens + 1


def test_developer_and_text_parts_are_what_a_system_string_is(client: openai.OpenAI) -> None:
    def ask(messages: list[dict[str, object]]) -> str | None:
        completion = client.chat.completions.create(
            model=TINY_CHAT,
            messages=messages,
            max_tokens=10,
            temperature=0,  # type: ignore[arg-type]
        )
        return completion.choices[0].message.content

    plain = ask([{"role": "system", "content": "be brief"}, *HELLO])
    assert ask([{"role": "developer", "content": "be brief"}, *HELLO]) == plain
    parts = [{"type": "text", "text": "be brief"}]
    assert ask([{"role": "system", "content": parts}, *HELLO]) == plain


def test_a_model_without_a_template_refuses_chat_but_completes(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-a.gguf", messages=HELLO)
    assert caught.value.code == "no_chat_template"
    assert caught.value.param == "messages"
    completion = client.completions.create(model="tiny-a.gguf", prompt="hello", max_tokens=4)
    assert completion.choices[0].finish_reason == "length"


def test_a_configured_builtin_template_and_defaults(client: openai.OpenAI) -> None:
    """tiny-b has no template of its own: its table gives it llama.cpp's chatml, and
    defaults (greedy, 5 tokens) for what a request leaves out."""
    first = client.chat.completions.create(model="tiny-b", messages=HELLO)
    again = client.chat.completions.create(model="tiny-b", messages=HELLO)
    assert first.usage is not None
    assert first.usage.completion_tokens == 5
    assert first.choices[0].message.content == again.choices[0].message.content
    longer = client.chat.completions.create(model="tiny-b", messages=HELLO, max_tokens=7)
    assert longer.usage is not None
    assert longer.usage.completion_tokens == 7
    content = longer.choices[0].message.content
    assert content is not None
    assert content.startswith(first.choices[0].message.content or "")  # greedy, still


def test_defaults_apply_to_infer_too(server: RunningServer) -> None:
    with server.client() as http:
        answer = http.post("/infer", json={"model": "tiny-b", "prompt": "hi", "stream": False})
    assert answer.status_code == 200, answer.text
    assert answer.json()["metrics"]["completion_tokens"] == 5


# ------------------------------------------------------------------------------ completions


@pytest.mark.parametrize(
    "params",
    [{"temperature": 0}, {"temperature": 0.9, "seed": 7, "top_p": 0.9}],
    ids=["greedy", "seeded"],
)
def test_completions_equal_infer(
    client: openai.OpenAI, server: RunningServer, params: dict[str, object]
) -> None:
    completion = client.completions.create(
        model="tiny-a.gguf",
        prompt="hello world",
        max_tokens=20,
        **params,  # type: ignore[arg-type]
    )
    streamed = client.completions.create(
        model="tiny-a.gguf",
        prompt="hello world",
        max_tokens=20,
        stream=True,
        **params,  # type: ignore[arg-type]
    )
    streamed_text = "".join(c.choices[0].text for c in streamed if c.choices)
    with server.client() as http:
        infer = http.post(
            "/infer",
            json={"model": "tiny-a.gguf", "prompt": "hello world", "max_tokens": 20,
                  "stream": False, **params},
        ).json()  # fmt: skip
    assert completion.choices[0].text == infer["text"] == streamed_text
    assert completion.object == "text_completion"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == infer["metrics"]["prompt_tokens"]


def test_without_max_tokens_a_completion_runs_to_the_end_of_the_context(
    client: openai.OpenAI,
) -> None:
    completion = client.completions.create(model="tiny-a.gguf", prompt="hello")
    assert completion.usage is not None
    assert completion.usage.total_tokens == 256  # the suite's --n-ctx
    assert completion.choices[0].finish_reason == "length"


# ------------------------------------------------------------------------------ embeddings


def test_embeddings_base64_equals_float_and_are_normalised(client: openai.OpenAI) -> None:
    texts = ["hello", "the world", "hello"]
    default = client.embeddings.create(model="tiny-a.gguf", input=texts)  # base64 on the wire
    floats = client.embeddings.create(model="tiny-a.gguf", input=texts, encoding_format="float")
    assert [d.index for d in default.data] == [0, 1, 2]
    for a, b in zip(default.data, floats.data, strict=True):
        assert len(a.embedding) == 64  # the tiny model's n_embd
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        assert math.sqrt(sum(x * x for x in a.embedding)) == pytest.approx(1.0, abs=1e-5)
    assert floats.data[0].embedding == floats.data[2].embedding  # same text, same vector
    assert floats.data[0].embedding != floats.data[1].embedding
    assert default.usage.prompt_tokens == default.usage.total_tokens > 3


def test_embeddings_of_token_ids(client: openai.OpenAI, server: RunningServer) -> None:
    """What the best-known embedding wrapper sends by default: token ids, one list or a
    list of lists, each an input of its own, as many tokens as ids."""
    one = client.embeddings.create(model="tiny-a.gguf", input=[5, 6, 7], encoding_format="float")
    many = client.embeddings.create(model="tiny-a.gguf", input=[[5, 6, 7], [8, 9]])
    assert len(one.data) == 1
    assert [d.index for d in many.data] == [0, 1]
    assert many.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-6)
    assert many.data[0].embedding != many.data[1].embedding
    assert (one.usage.prompt_tokens, many.usage.prompt_tokens) == (3, 5)
    with pytest.raises(openai.BadRequestError) as too_long:  # one batch at most, no cut
        client.embeddings.create(model="tiny-a.gguf", input=[5] * 5000)
    assert too_long.value.code == "context_length_exceeded"
    assert too_long.value.param == "input"


def test_max_tokens_past_the_context_is_a_cap(client: openai.OpenAI) -> None:
    """As llama-server and Ollama: generation stops where the context ends."""
    chat = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_completion_tokens=100_000, temperature=0
    )
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage is not None
    assert chat.usage.prompt_tokens + chat.usage.completion_tokens == 256  # --n-ctx
    completion = client.completions.create(model="tiny-a.gguf", prompt="hi", max_tokens=100_000)
    assert completion.choices[0].finish_reason == "length"


def test_embeddings_base64_on_the_wire_is_little_endian_float32(server: RunningServer) -> None:
    body = {"model": "tiny-a.gguf", "input": "hello", "encoding_format": "base64"}
    with server.client() as http:
        as_base64 = http.post("/v1/embeddings", json=body).json()
        as_floats = http.post("/v1/embeddings", json={**body, "encoding_format": "float"}).json()
    import struct

    raw = base64.b64decode(as_base64["data"][0]["embedding"])
    decoded = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert list(decoded) == pytest.approx(as_floats["data"][0]["embedding"], abs=1e-7)


# ------------------------------------------------------------------------------ 400s


BAD_CHATS = [
    ({"n": 9}, "n"),  # at most 8 choices
    ({"n": 0}, "n"),
    ({"n": "2"}, "n"),  # not an int
    ({"n": 1.5}, "n"),
    ({"n": True}, "n"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),  # OpenAI's 0 to 20
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # needs logprobs: true
    ({"logprobs": "yes"}, "logprobs"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}] * 2}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"42": -100}}, "logit_bias"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"max_tokens": 5, "max_completion_tokens": 6}, "max_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"stop": ["a"] * 17}, "stop"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}}, "response_format"),  # noqa: E501
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages[0].content"),  # noqa: E501
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "a"}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "x" * 20_000}]}, "messages"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "param"), BAD_CHATS, ids=[p for _, p in BAD_CHATS])
def test_a_known_field_modeld_cannot_honour_is_a_400_naming_it(
    client: openai.OpenAI, server: RunningServer, extra: dict[str, object], param: str
) -> None:
    before = answered(server, "/v1/chat/completions", 400)
    kwargs: dict[str, object] = {"model": TINY_CHAT, "messages": HELLO, **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert caught.value.param == param, caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    assert answered(server, "/v1/chat/completions", 400) == before + 1  # not retried


BAD_OTHERS = [
    ("completions", {"prompt": [1, 2, 3]}, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, "prompt"),
    ("completions", {"prompt": "a", "echo": True}, "echo"),
    ("completions", {"prompt": "a", "suffix": "b"}, "suffix"),
    ("completions", {"prompt": "a", "best_of": 2}, "best_of"),
    ("completions", {"prompt": "a", "logprobs": 21}, "logprobs"),
    ("completions", {"prompt": "a", "logprobs": True}, "logprobs"),
    ("embeddings", {"input": [[1, 2, 10**9]]}, "input"),  # not this vocabulary's
    ("embeddings", {"input": [[1, 2], "a"]}, "input"),
    ("embeddings", {"input": [[]]}, "input"),
    ("embeddings", {"input": []}, "input"),
    ("embeddings", {"input": [""]}, "input"),
    ("embeddings", {"input": "a", "encoding_format": "int8"}, "encoding_format"),
    ("embeddings", {"input": "a", "dimensions": 32}, "dimensions"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("endpoint", "body", "param"), BAD_OTHERS, ids=[f"{e}-{p}" for e, _, p in BAD_OTHERS]
)
def test_completions_and_embeddings_name_what_they_refuse(
    server: RunningServer, endpoint: str, body: dict[str, object], param: str
) -> None:
    with server.client() as http:
        response = http.post(f"/v1/{endpoint}", json={"model": "tiny-a.gguf", **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert set(error) >= {"message", "type", "param", "code"}
    if body.get("input") == [[1, 2, 10**9]]:
        assert "vocabulary" in error["message"]


def test_unknown_fields_are_ignored(server: RunningServer) -> None:
    body = {
        "model": TINY_CHAT, "messages": HELLO, "max_tokens": 2, "store": True,
        "metadata": {"a": "b"}, "service_tier": "auto", "prompt_cache_key": "k",
        "safety_identifier": "s", "verbosity": "low", "user": "u", "n": 1, "tools": [],
        "parallel_tool_calls": True, "logprobs": False, "stream_options": None,
    }  # fmt: skip
    with server.client() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


def test_malformed_json_and_an_unknown_route_answer_in_openai_shape(server: RunningServer) -> None:
    with server.client() as http:
        malformed = http.post("/v1/chat/completions", content=b"{not json")
        unknown = http.get("/v1/assistants")
    assert malformed.status_code == 400
    assert malformed.json()["error"]["type"] == "invalid_request_error"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["type"] == "not_found_error"


# ------------------------------------------------------------------------------ responses


def test_responses_text_in_and_out(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model="tiny-chat", input="hello world", instructions="be brief", max_output_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert response.status == "incomplete"  # stopped by max_output_tokens
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text
    assert response.usage is not None
    assert response.usage.output_tokens == 8
    chat = client.chat.completions.create(
        model="tiny-chat", max_tokens=8, temperature=0,
        messages=[{"role": "system", "content": "be brief"}, *HELLO],  # type: ignore[list-item]
    )  # fmt: skip
    assert response.output_text == chat.choices[0].message.content


def test_responses_stream_events(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model="tiny-chat", input=[{"role": "user", "content": "hello world"}],
        max_output_tokens=6, temperature=0, stream=True,
    )  # fmt: skip
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added",
    ]  # fmt: skip
    assert kinds[-4:] == [
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.incomplete",
    ]  # fmt: skip
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == events[-4].text  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    item = events[-2].item  # type: ignore[union-attr]
    assert item.status == "incomplete"  # as its response is


def test_responses_fields_strict_clients_read(server: RunningServer) -> None:
    """What OpenAI's published schema has and strict SDKs read: ``logprobs`` on output
    text, ``cache_write_tokens``, the schema asked for echoed in ``text.format``, a
    message ``incomplete`` in an ``incomplete`` response."""
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}  # fmt: skip
    text_format = {"type": "json_schema", "name": "answer", "schema": schema, "strict": True}
    body = {"model": "tiny-chat", "input": "hi", "max_output_tokens": 2,
            "text": {"format": text_format}}  # fmt: skip
    with server.client() as http:
        response = http.post("/v1/responses", json=body).json()
        plain = http.post("/v1/responses", json={**body, "text": None}).json()
    assert response["status"] == "incomplete"
    (message,) = response["output"]
    assert message["status"] == "incomplete"
    assert message["content"][0]["logprobs"] == []
    assert response["text"]["format"] == text_format
    assert plain["text"]["format"] == {"type": "text"}
    details = response["usage"]["input_tokens_details"]
    assert (
        details["cached_tokens"] + details["cache_write_tokens"]
        == response["usage"]["input_tokens"]
    )


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"type": "function_call_output", "call_id": "a", "output": "x"}]}, "input[0]"),
    ],
    ids=["tools", "previous", "tool-output"],
)
def test_responses_refuse_what_needs_state_or_tools(
    client: openai.OpenAI, extra: dict[str, object], param: str
) -> None:
    kwargs: dict[str, object] = {"model": "tiny-chat", "input": "hi", **extra}
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**kwargs)  # type: ignore[call-overload]
    assert caught.value.param == param


def test_a_bearer_is_accepted_and_the_request_id_reused(server: RunningServer) -> None:
    with server.client() as http:
        response = http.post(
            "/v1/completions",
            json={"model": "tiny-a.gguf", "prompt": "hi", "max_tokens": 1},
            headers={"Authorization": "Bearer whatever", "X-Request-ID": "my-id-1"},
        )
    assert response.status_code == 200
    assert response.json()["id"] == "cmpl-my-id-1"


def test_json_mode_on_a_tiny_model(server: RunningServer) -> None:
    """``json_object``: the random model's answer starts as JSON must (the grammar)."""
    body = {
        "model": TINY_CHAT, "messages": HELLO, "max_tokens": 30, "temperature": 0,
        "response_format": {"type": "json_object"},
    }  # fmt: skip
    with server.client() as http:
        free = http.post("/v1/chat/completions", json={**body, "response_format": None}).json()
        constrained = http.post("/v1/chat/completions", json=body).json()
    assert not free["choices"][0]["message"]["content"].startswith("{")
    assert constrained["choices"][0]["message"]["content"].startswith("{")


def test_a_schema_is_enforced_to_the_end(server: RunningServer) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
        "required": ["ok", "n"], "additionalProperties": False,
    }  # fmt: skip
    body = {
        "model": TINY_CHAT, "messages": HELLO, "max_tokens": 64, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema, "strict": True}},  # noqa: E501
    }  # fmt: skip
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json=body).json()
    assert answer["choices"][0]["finish_reason"] == "stop"  # the grammar completed
    assert set(json.loads(answer["choices"][0]["message"]["content"])) == {"ok", "n"}


def test_infer_takes_the_same_format(server: RunningServer) -> None:
    with server.client() as http:
        answer = http.post(
            "/infer",
            json={"model": "tiny-a.gguf", "prompt": "hi", "max_tokens": 30, "temperature": 0,
                  "format": "json", "stream": False},
        ).json()  # fmt: skip
        refused = http.post(
            "/infer", json={"model": "tiny-a.gguf", "prompt": "hi", "format": {"type": "nope"}}
        )
    assert answer["text"].startswith("{")
    assert refused.status_code == 400
    assert refused.json()["error"]["field"] == "format"


# ------------------------------------------------------------------ llama-server's fields


def test_llama_servers_grammar_fields_are_enforced(client: openai.OpenAI) -> None:
    """A client moving from llama-server keeps its constraints: a raw GBNF ``grammar``,
    a top-level ``json_schema``, ``response_format: {type: json_object, schema}``."""
    yes_no = 'root ::= "yes" | "no"'
    chat = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=8, extra_body={"grammar": yes_no}
    )
    assert chat.choices[0].message.content in ("yes", "no")
    completion = client.completions.create(
        model="tiny-a.gguf", prompt="hi", max_tokens=8, extra_body={"grammar": yes_no}
    )
    assert completion.choices[0].text in ("yes", "no")
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
              "required": ["ok"], "additionalProperties": False}  # fmt: skip
    for extra in ({"json_schema": schema},
                  {"response_format": {"type": "json_object", "schema": schema}}):  # fmt: skip
        answer = client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=32, extra_body=extra
        )
        assert set(json.loads(answer.choices[0].message.content or "")) == {"ok"}, extra


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"grammar": 'root ::= "a"{5000}'}, "grammar"),  # over the repetition bound
        ({"grammar": 'root ::= ("a"{2000}){2000}'}, "grammar"),  # expands too far
        ({"grammar": "root ::= ("}, "grammar"),  # llama.cpp refuses it: checked first
        ({"grammar": "x" * 300_000}, "grammar"),
        ({"grammar": 'root ::= "a"', "json_schema": {"type": "object"}}, "grammar"),
        ({"grammar": 5}, "grammar"),
    ],
    ids=["repetition", "expansion", "refused", "size", "two", "type"],
)
def test_a_raw_grammar_is_bounded_like_a_schema(
    client: openai.OpenAI, server: RunningServer, extra: dict[str, object], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=4,
                                       extra_body=extra)  # fmt: skip
    assert caught.value.param == param, caught.value.message
    fine = client.chat.completions.create(model=TINY_CHAT, messages=HELLO, max_tokens=2)
    assert fine.choices[0].finish_reason == "length"  # and the server goes on


def test_n_choices_each_with_its_index_and_finish_reason(client: openai.OpenAI) -> None:
    """``n`` answers to one prompt, one after another (seed, seed + 1, ...); the usage
    counts the prompt once and every choice's tokens."""
    chat = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=6, n=3, seed=7, temperature=1.0
    )
    assert [choice.index for choice in chat.choices] == [0, 1, 2]
    assert all(choice.finish_reason == "length" for choice in chat.choices)
    assert len({choice.message.content for choice in chat.choices}) > 1  # seeds differ
    assert chat.usage is not None
    assert chat.usage.completion_tokens == 18
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + 18
    again = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, max_tokens=6, n=3, seed=7, temperature=1.0
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in chat.choices]
    completion = client.completions.create(model="tiny-a.gguf", prompt="hi", max_tokens=4, n=2)
    assert [choice.index for choice in completion.choices] == [0, 1]
