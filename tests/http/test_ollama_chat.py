"""Ollama's chat, embeddings, ``format`` and ``system`` through the real ``ollama``
client (0.6.3) and a real server: the same chat templates, grammar and embedding engine
as the OpenAI routes (tests/http/test_openai.py), so the answers are compared with them."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import ollama
import pytest

from tests.support.http import GEMMA, GEMMA_FLAGS, ServerFactory
from tests.support.openai_clients import TINY_CHAT
from tests.support.server import RunningServer
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

GREEDY = {"temperature": 0, "num_predict": 12}
HELLO = [{"role": "user", "content": "hello world"}]
CONFIG = """
[models."tiny-chat.gguf"]
aliases = ["chatty"]

[models."tiny-b.gguf"]
chat_template = "chatml"
keep_alive = "30m"
"""
SCHEMA = {
    "type": "object",
    "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer"}},
    "required": ["ok", "n"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def chat_models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    directory = tmp_path_factory.mktemp("ollama-chat-models")
    write_tiny_gguf(directory / TINY_CHAT, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    for name in ("tiny-a.gguf", "tiny-b.gguf"):
        shutil.copyfile(tiny_model_dir / name, directory / name)
    (directory / "modeld.toml").write_text(CONFIG)
    return directory


@pytest.fixture(scope="module")
def server(chat_models_dir: Path, module_server_factory: ServerFactory) -> RunningServer:
    return module_server_factory(
        chat_models_dir, "--config", str(chat_models_dir / "modeld.toml"), "--keep-alive", "1m"
    )


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.base_url, timeout=60) as client:
        yield client


def openai_chat(server: RunningServer, messages: list[dict[str, str]], **extra: object) -> str:
    body = {"model": TINY_CHAT, "messages": messages, "max_tokens": 12, "temperature": 0, **extra}
    with server.client() as http:
        answer = http.post("/v1/chat/completions", json=body).json()
    return str(answer["choices"][0]["message"]["content"])


# --- chat ----------------------------------------------------------------------------------


def test_chat_whole_and_streamed_agree_with_openai_chat(
    api: ollama.Client, server: RunningServer
) -> None:
    whole = api.chat(model=TINY_CHAT, messages=HELLO, options=GREEDY)
    assert whole.done is True
    assert whole.done_reason == "length"
    assert whole.message.role == "assistant"
    assert whole.message.content
    assert whole.eval_count == 12
    assert whole.prompt_eval_count is not None
    assert whole.prompt_eval_count > 0
    for duration in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(whole[duration], int), duration
    assert whole.message.content == openai_chat(server, HELLO)  # the same template path
    parts = list(api.chat(model="chatty:latest", messages=HELLO, options=GREEDY, stream=True))
    assert all(part.done is False for part in parts[:-1])
    assert all(part.message.role == "assistant" for part in parts)
    assert parts[-1].done is True
    assert parts[-1].done_reason == "length"
    assert parts[-1].message.content == ""
    assert parts[-1].eval_count == 12
    assert "".join(part.message.content or "" for part in parts) == whole.message.content
    assert parts[0].model == "chatty:latest"  # the name as the client sent it


def test_chat_on_the_wire_is_ndjson_with_message_objects(server: RunningServer) -> None:
    body = {"model": TINY_CHAT, "messages": HELLO, "options": GREEDY}
    with server.client() as http:
        response = http.post("/api/chat", json=body)
        whole = http.post("/api/chat", json={**body, "stream": False})
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.content.decode().split("\n")[:-1]]
    assert all(set(line["message"]) == {"role", "content"} for line in lines)
    assert lines[-1]["done"] is True
    assert whole.headers["content-type"] == "application/json"
    assert whole.json()["message"]["content"] == "".join(
        str(line["message"]["content"]) for line in lines
    )


def test_a_conversation_with_system_and_history(api: ollama.Client, server: RunningServer) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi there"},
        {"role": "user", "content": "and again"},
    ]
    answer = api.chat(model=TINY_CHAT, messages=messages, options=GREEDY)
    assert answer.message.content == openai_chat(server, messages)
    assert (
        answer.message.content
        != api.chat(model=TINY_CHAT, messages=HELLO, options=GREEDY)["message"]["content"]
    )


def test_a_configured_builtin_template_gives_chat(api: ollama.Client) -> None:
    """tiny-b has no template of its own; the config gives it chatml."""
    answer = api.chat(model="tiny-b", messages=HELLO, options=GREEDY)
    assert answer.done_reason == "length"
    assert answer.eval_count == 12


def test_empty_messages_load_and_keep_alive_zero_unloads(api: ollama.Client) -> None:
    loaded = api.chat(model="chatty", messages=[], keep_alive="10m")
    assert loaded.done_reason == "load"
    assert loaded.message.content == ""
    assert any(model.model == f"{TINY_CHAT}:latest" for model in api.ps().models)
    unloaded = api.chat(model="chatty", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert all(model.model != f"{TINY_CHAT}:latest" for model in api.ps().models)


# --- generate: system, raw, templates --------------------------------------------------------


def test_generate_renders_system_and_prompt_through_the_template(
    api: ollama.Client, server: RunningServer
) -> None:
    templated = api.generate(model=TINY_CHAT, prompt="hello", system="Be brief.", options=GREEDY)
    as_chat = api.chat(
        model=TINY_CHAT,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}],
        options=GREEDY,
    )
    assert templated.response == as_chat.message.content
    no_system = api.generate(model=TINY_CHAT, prompt="hello", options=GREEDY)
    assert no_system.response == openai_chat(server, [{"role": "user", "content": "hello"}])
    raw = api.generate(model=TINY_CHAT, prompt="hello", raw=True, options=GREEDY)
    with server.client() as http:
        infer = http.post(
            "/infer",
            json={"model": TINY_CHAT, "prompt": "hello", "max_tokens": 12, "temperature": 0,
                  "stream": False},
        ).json()  # fmt: skip
    assert raw.response == infer["text"]  # raw: the prompt as it is
    assert raw.prompt_eval_count is not None
    assert templated.prompt_eval_count is not None
    assert raw.prompt_eval_count < templated.prompt_eval_count


def test_generate_without_a_template_sends_the_prompt_as_it_is(api: ollama.Client) -> None:
    plain = api.generate(model="tiny-a", prompt="hello", options=GREEDY)
    with_system = api.generate(model="tiny-a", prompt="hello", system="Be brief.", options=GREEDY)
    assert with_system.response == plain.response  # {{ .Prompt }}: system has no place
    assert with_system.prompt_eval_count == plain.prompt_eval_count


# --- format ----------------------------------------------------------------------------------


def test_format_json_is_enforced_on_generate_and_chat(api: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 30}
    free = api.generate(model=TINY_CHAT, prompt="hello", options=options)
    assert free.response is not None
    assert not free.response.lstrip().startswith("{")
    constrained = api.generate(model=TINY_CHAT, prompt="hello", format="json", options=options)
    assert constrained.response is not None
    assert constrained.response.startswith("{")
    chat = api.chat(model=TINY_CHAT, messages=HELLO, format="json", options=options)
    assert chat.message.content is not None
    assert chat.message.content.startswith("{")


@pytest.mark.parametrize("stream", [False, True])
def test_a_schema_is_enforced_to_the_end(api: ollama.Client, stream: bool) -> None:
    options = {"temperature": 0, "num_predict": 64}
    if stream:
        parts = list(api.chat(model=TINY_CHAT, messages=HELLO, format=SCHEMA, options=options,
                              stream=True))  # fmt: skip
        text = "".join(part.message.content or "" for part in parts)
        reason = parts[-1].done_reason
    else:
        answer = api.generate(model=TINY_CHAT, prompt="hello", format=SCHEMA, options=options)
        text, reason = answer.response or "", answer.done_reason
    assert reason == "stop"  # the grammar completed the object
    parsed = json.loads(text)
    assert set(parsed) == {"ok", "n"}
    assert isinstance(parsed["ok"], bool)
    assert isinstance(parsed["n"], int)


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda api: api.chat(model="tiny-a", messages=HELLO), "no chat template"),
        (lambda api: api.chat(model=TINY_CHAT, messages=HELLO, think=True), "thinking"),
        (lambda api: api.chat(model=TINY_CHAT, messages=HELLO, think="high"), "thinking"),
        (lambda api: api.generate(model=TINY_CHAT, prompt="x", think=True), "thinking"),
        (
            lambda api: api.chat(
                model=TINY_CHAT, messages=[{"role": "user", "content": "x", "images": ["aGk="]}]
            ),
            "does not support images",
        ),
        (lambda api: api.generate(model=TINY_CHAT, prompt="x", images=["aGk="]), "images"),
        (
            lambda api: api.chat(
                model=TINY_CHAT,
                messages=HELLO,
                tools=[{"type": "function", "function": {"name": "f", "description": "d"}}] * 2,
            ),
            "duplicate function name 'f'",
        ),
        (
            lambda api: api.chat(model=TINY_CHAT, messages=[{"role": "tool", "content": "42"}]),
            "a tool message answers no earlier tool call",
        ),
        (
            lambda api: api.chat(model=TINY_CHAT, messages=HELLO, format={"type": "nope"}),
            "the JSON schema cannot be enforced",
        ),
        (lambda api: api.embed(model="missing", input="x"), 'model "missing" not found'),
    ],
)
def test_what_modeld_cannot_do_is_a_400_with_a_string(
    api: ollama.Client, call: object, message: str
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        call(api)  # type: ignore[operator]
    assert caught.value.status_code == (404 if "not found" in message else 400)
    assert isinstance(caught.value.error, str)
    assert message in caught.value.error


def test_empty_tools_are_no_tools(api: ollama.Client) -> None:
    answer = api.chat(model=TINY_CHAT, messages=HELLO, tools=[], options=GREEDY)
    assert answer.done_reason == "length"


# --- embeddings ------------------------------------------------------------------------------


def test_embed_is_normalised_and_equals_v1_embeddings(
    api: ollama.Client, server: RunningServer
) -> None:
    one = api.embed(model="tiny-a", input="hello world")
    assert len(one.embeddings) == 1
    (vector,) = one.embeddings
    assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
    assert one.model == "tiny-a"
    assert one.prompt_eval_count is not None
    assert one.prompt_eval_count > 0
    assert isinstance(one.total_duration, int)
    assert isinstance(one.load_duration, int)
    assert one.total_duration >= one.load_duration >= 0
    two = api.embed(model="tiny-a.gguf:latest", input=["hello world", "something else"])
    assert len(two.embeddings) == 2
    assert two.embeddings[0] == pytest.approx(vector, abs=1e-5)
    assert two.embeddings[1] != pytest.approx(vector, abs=1e-3)
    with server.client() as http:
        v1 = http.post("/v1/embeddings", json={"model": "tiny-a.gguf", "input": "hello world"})
    assert v1.json()["data"][0]["embedding"] == pytest.approx(vector, abs=1e-5)


def test_legacy_embeddings_take_a_prompt(api: ollama.Client) -> None:
    legacy = api.embeddings(model="tiny-a", prompt="hello world")
    current = api.embed(model="tiny-a", input="hello world")
    assert legacy.embedding == pytest.approx(current.embeddings[0], abs=1e-5)
    assert math.isclose(math.fsum(x * x for x in legacy.embedding), 1.0, rel_tol=1e-4)


def test_embed_without_input_loads_and_bad_input_is_a_400(
    api: ollama.Client, server: RunningServer
) -> None:
    assert api.embed(model="tiny-b", input=[]).embeddings == []
    assert any(model.model == "tiny-b.gguf:latest" for model in api.ps().models)
    with pytest.raises(ollama.ResponseError) as caught:
        api.embed(model="tiny-a", input=["ok", ""])
    assert caught.value.status_code == 400
    assert "input 1" in caught.value.error
    with server.client() as http:
        refused = http.post("/api/embed", json={"model": "tiny-a", "input": "x", "dimensions": 3})
    assert refused.status_code == 400
    assert "dimensions" in refused.json()["error"]


def test_a_format_that_is_neither_json_nor_a_schema_is_a_400(server: RunningServer) -> None:
    """(The client itself refuses to send one: plain HTTP.)"""
    with server.client() as http:
        refused = http.post("/api/generate", json={"model": TINY_CHAT, "prompt": "x",
                                                   "format": "xml"})  # fmt: skip
    assert refused.status_code == 400
    assert refused.json() == {"error": "\"format\": Invalid enum value 'xml'"}


# --- show, keep-alive per model ---------------------------------------------------------------


def test_show_lists_chat_only_where_a_template_exists(api: ollama.Client) -> None:
    """(Tools go with chat: the generic tool-call format needs no template support.)"""
    own = api.show(TINY_CHAT)
    assert own.capabilities == ["completion", "embedding", "chat", "tools"]
    assert own.template == TINY_CHAT_TEMPLATE
    configured = api.show("tiny-b")
    assert configured.capabilities == ["completion", "embedding", "chat", "tools"]
    assert configured.template == "chatml"
    plain = api.show("tiny-a")
    assert plain.capabilities == ["completion", "embedding"]
    assert plain.template == ""
    assert api.show("chatty:latest").capabilities == own.capabilities  # an alias


def test_keep_alive_request_beats_model_beats_the_flag(api: ollama.Client) -> None:
    def remaining(model: str) -> timedelta:
        (instance,) = [m for m in api.ps().models if m.model == f"{model}:latest"]
        assert instance.expires_at is not None
        return instance.expires_at - datetime.now(UTC)

    api.generate(model="tiny-a", prompt="hi", options={"num_predict": 1})
    assert timedelta(seconds=50) < remaining("tiny-a.gguf") <= timedelta(minutes=1)  # the flag
    api.generate(model="tiny-b", prompt="hi", options={"num_predict": 1})
    assert timedelta(minutes=29) < remaining("tiny-b.gguf") <= timedelta(minutes=30)  # [models]
    api.generate(model="tiny-b", prompt="hi", options={"num_predict": 1}, keep_alive="10m")
    assert timedelta(minutes=9) < remaining("tiny-b.gguf") <= timedelta(minutes=10)  # request
    api.embed(model="tiny-b", input="hi", keep_alive=-1)
    assert remaining("tiny-b.gguf") > timedelta(days=365 * 50)  # embeddings set it too
    api.chat(model="tiny-b", messages=HELLO, options={"num_predict": 1})
    assert timedelta(minutes=29) < remaining("tiny-b.gguf") <= timedelta(minutes=30)


# --- Gemma, where real text matters ----------------------------------------------------------


@pytest.mark.slow
def test_gemma_chat_system_and_schema(start_server: ServerFactory, gemma_dir: Path) -> None:
    """Gemma's file has no template: the operator's chat_template gives it llama.cpp's."""
    config = gemma_dir.parent / "gemma.toml"
    config.write_text(f'[models."{GEMMA}"]\nchat_template = "gemma"\n')
    server = start_server(gemma_dir, *GEMMA_FLAGS, "--config", str(config))
    greedy = {"temperature": 0, "num_predict": 48}
    with ollama.Client(host=server.base_url, timeout=300) as api:
        shown = api.show("gemma-3-270m-q4_k_m")
        assert shown.capabilities == ["completion", "embedding", "chat", "tools"]
        assert shown.template == "gemma"
        system = "You answer in one short sentence."
        generated = api.generate(model=GEMMA, system=system, prompt="Name a fruit.", options=greedy)
        chatted = api.chat(
            model=GEMMA,
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": "Name a fruit."}],
            options=greedy,
        )  # fmt: skip
        assert generated.response
        assert generated.response == chatted.message.content
        raw = api.generate(model=GEMMA, prompt="Name a fruit.", raw=True, options=greedy)
        assert raw.prompt_eval_count is not None
        assert generated.prompt_eval_count is not None
        assert raw.prompt_eval_count < generated.prompt_eval_count
        schema = {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40},
                           "country": {"type": "string", "maxLength": 40}},
            "required": ["city", "country"], "additionalProperties": False,
        }  # fmt: skip
        answer = api.chat(
            model=GEMMA,
            messages=[{"role": "user", "content": "Name the capital of France as JSON."}],
            format=schema,
            options={"temperature": 0, "num_predict": 120},
        )
        assert answer.done_reason == "stop"
        parsed = json.loads(answer.message.content or "")
        assert set(parsed) == {"city", "country"}
        assert all(isinstance(value, str) for value in parsed.values())


# --- the context: caps, truncation, aliases (issue 21) ---------------------------------------

N_CTX = 256  # the test servers' --n-ctx


def test_aliases_are_listed_as_ollama_lists_models(api: ollama.Client) -> None:
    """A client that checks a name against /api/tags accepts the alias it is told to use."""
    names = {model.model for model in api.list().models}
    assert {"chatty:latest", f"{TINY_CHAT}:latest", "tiny-a.gguf:latest"} <= names
    answer = api.chat(model="chatty:latest", messages=HELLO, options=GREEDY)
    assert answer.done_reason == "length"


def test_num_predict_past_the_context_is_a_cap(api: ollama.Client) -> None:
    """As Ollama: generation stops at the context's end with ``length``, no 400."""
    for call in (
        lambda: api.generate(model="tiny-a", prompt="hello world", raw=True,
                             options={"num_predict": 100_000, "temperature": 0}),
        lambda: api.chat(model=TINY_CHAT, messages=HELLO,
                         options={"num_predict": 100_000, "temperature": 0}),
    ):  # fmt: skip
        answer = call()
        assert answer.done_reason == "length"
        assert answer.prompt_eval_count + answer.eval_count == N_CTX


def test_a_chat_longer_than_the_context_keeps_the_system_message_and_the_latest_turns(
    api: ollama.Client, server: RunningServer
) -> None:
    turns = [{"role": "system", "content": "be brief"}]
    for index in range(60):
        role = "user" if index % 2 == 0 else "assistant"
        turns.append({"role": role, "content": f"turn {index} hello world hello"})
    answer = api.chat(model=TINY_CHAT, messages=turns, options=GREEDY)
    assert answer.done_reason == "length"
    assert answer.eval_count == GREEDY["num_predict"]
    assert answer.prompt_eval_count <= N_CTX - GREEDY["num_predict"]
    # the same prompt as the system message and the most recent turns alone
    kept = [api.chat(model=TINY_CHAT, messages=[turns[0], *turns[-k:]], options=GREEDY)
            for k in range(1, 12)]  # fmt: skip
    same = [
        fitted
        for fitted in kept
        if (fitted.prompt_eval_count, fitted.message.content)
        == (answer.prompt_eval_count, answer.message.content)
    ]
    assert same, [fitted.prompt_eval_count for fitted in kept]
    with server.client() as http:  # OpenAI's routes keep OpenAI's error
        refused = http.post(
            "/v1/chat/completions", json={"model": TINY_CHAT, "messages": turns, "max_tokens": 4}
        )
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert refused.json()["error"]["param"] == "messages"


def test_a_raw_prompt_longer_than_the_context_keeps_its_end(api: ollama.Client) -> None:
    prompt = " ".join(f"w{i}" for i in range(600))
    answer = api.generate(model="tiny-a", prompt=prompt, raw=True, options=GREEDY)
    assert answer.done_reason == "length"
    assert answer.prompt_eval_count == N_CTX - GREEDY["num_predict"]
    # another beginning, the same end: the same prompt once truncated, so the same answer
    ending = api.generate(model="tiny-a", prompt="x " + prompt[-400:], raw=True, options=GREEDY)
    assert (ending.prompt_eval_count, ending.response) == (
        answer.prompt_eval_count,
        answer.response,
    )


def test_embed_truncates_unless_told_not_to(api: ollama.Client) -> None:
    long_input = "hello world " * 300
    cut = api.embed(model="tiny-a", input=long_input)
    assert len(cut.embeddings) == 1
    assert math.isclose(math.fsum(x * x for x in cut.embeddings[0]), 1.0, abs_tol=1e-5)
    with pytest.raises(ollama.ResponseError) as refused:
        api.embed(model="tiny-a", input=long_input, truncate=False)
    assert refused.value.status_code == 400
    assert "input 0" in refused.value.error
