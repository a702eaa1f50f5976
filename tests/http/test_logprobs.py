"""Log probabilities over every protocol, through the real ``openai`` and ``ollama``
clients (plain HTTP for what a client cannot express): one entry per generated token,
the streamed entries equal to the whole answer's, none lost or repeated around a stop
string, and bad counts refused naming the wire field."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import openai
import pytest

from tests.support.http import ServerFactory
from tests.support.openai_clients import TINY_CHAT, openai_client, write_chat_models
from tests.support.server import RunningServer

HELLO = [{"role": "user", "content": "hello world"}]
TINY = "tiny-a.gguf"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
    module_server_factory: ServerFactory,
) -> RunningServer:  # fmt: skip
    directory = write_chat_models(tmp_path_factory.mktemp("logprob-models"))
    shutil.copyfile(tiny_model_dir / TINY, directory / TINY)
    return module_server_factory(directory)


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai_client(server)


@pytest.fixture(scope="module")
def api(server: RunningServer) -> Iterator[ollama.Client]:
    with ollama.Client(host=server.base_url, timeout=60) as client:
        yield client


def _check_entries(entries: list[Any], text: str, top: int) -> None:
    assert entries
    assert bytes(b for e in entries for b in e["bytes"]).decode("utf-8", "replace") == text
    for entry in entries:
        assert entry["logprob"] <= 0.0
        assert len(entry["top_logprobs"]) == top
        values = [t["logprob"] for t in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        assert entry["token"] == bytes(entry["bytes"]).decode("utf-8", "replace")


def _same(streamed: list[Any], whole: list[Any]) -> None:
    assert [e["bytes"] for e in streamed] == [e["bytes"] for e in whole]
    assert [e["logprob"] for e in streamed] == pytest.approx(
        [e["logprob"] for e in whole], abs=1e-4
    )


GREEDY: dict[str, Any] = {"temperature": 0, "max_tokens": 10}


def test_chat_whole_and_streamed(client: openai.OpenAI) -> None:
    asked = {"model": TINY_CHAT, "messages": HELLO, "logprobs": True, "top_logprobs": 3}
    whole = client.chat.completions.create(**asked, **GREEDY)  # type: ignore[call-overload]
    choice = whole.choices[0]
    content = [e.model_dump() for e in choice.logprobs.content]
    assert len(content) == whole.usage.completion_tokens
    _check_entries(content, choice.message.content, 3)
    for entry in content:  # greedy: the chosen token is the likeliest
        assert entry["token"] == entry["top_logprobs"][0]["token"]
    streamed: list[Any] = []
    text = ""
    for chunk in client.chat.completions.create(**asked, **GREEDY, stream=True):  # type: ignore[call-overload]
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += [e.model_dump() for e in chunk.choices[0].logprobs.content]
            text += chunk.choices[0].delta.content or ""
    assert text == choice.message.content
    _same(streamed, content)


def test_without_logprobs_there_are_none(client: openai.OpenAI) -> None:
    plain = client.completions.create(model=TINY, prompt="The quick", **GREEDY)
    assert plain.choices[0].logprobs is None
    zero = client.completions.create(model=TINY, prompt="The quick", logprobs=0, **GREEDY)
    assert zero.choices[0].logprobs.top_logprobs == [{}] * zero.usage.completion_tokens
    chat = client.chat.completions.create(model=TINY_CHAT, messages=HELLO, **GREEDY)
    assert chat.choices[0].logprobs is None
    whole = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, logprobs=False, **GREEDY
    )  # type: ignore[call-overload]
    assert whole.choices[0].logprobs is None


def test_completions_legacy_shape_whole_and_streamed(client: openai.OpenAI) -> None:
    asked = {"model": TINY, "prompt": "The quick brown fox", "logprobs": 2, **GREEDY}
    whole = client.completions.create(**asked)
    logprobs = whole.choices[0].logprobs
    assert len(logprobs.tokens) == whole.usage.completion_tokens
    assert "".join(logprobs.tokens) == whole.choices[0].text
    assert logprobs.text_offset[0] == 0
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    tokens, values, offsets = [], [], []
    for chunk in client.completions.create(**asked, stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            tokens += chunk.choices[0].logprobs.tokens
            values += chunk.choices[0].logprobs.token_logprobs
            offsets += chunk.choices[0].logprobs.text_offset
    assert tokens == logprobs.tokens
    assert values == pytest.approx(logprobs.token_logprobs, abs=1e-4)
    assert offsets == logprobs.text_offset


def test_a_stop_string_loses_no_entry_and_repeats_none(client: openai.OpenAI) -> None:
    """The stop string's tokens (and what follows) report nothing; a token cut by it
    reports once; streamed and whole agree."""
    base = {"model": TINY, "prompt": "The quick brown fox", "logprobs": 1, **GREEDY}
    free = client.completions.create(**base).choices[0]
    plain = [i for i, t in enumerate(free.logprobs.tokens) if i and t.isprintable()]
    assert plain, free.logprobs.tokens  # the tiny model writes some whole characters
    at = plain[len(plain) // 2]
    stop = free.logprobs.tokens[at]
    cut = client.completions.create(**base, stop=[stop]).choices[0]
    assert cut.finish_reason == "stop"
    joined = "".join(cut.logprobs.tokens)
    assert joined.startswith(cut.text)
    assert len(cut.logprobs.tokens) <= at  # nothing of the stop string's token
    assert cut.logprobs.tokens == free.logprobs.tokens[: len(cut.logprobs.tokens)]
    streamed = []
    for chunk in client.completions.create(**base, stop=[stop], stream=True):
        if chunk.choices and chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.tokens
    assert streamed == cut.logprobs.tokens


def _ollama_entries(logprobs: Any, top: int) -> list[tuple[str, float]]:
    """The client's entries (it keeps no ``bytes``) as (token, logprob), checked."""
    entries = []
    for entry in logprobs or ():
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs or ()) == top
        entries.append((entry.token, entry.logprob))
    return entries


def test_ollama_generate_and_chat_whole_and_streamed(api: ollama.Client) -> None:
    options = {"temperature": 0, "num_predict": 8}
    asked: dict[str, Any] = {"model": TINY, "prompt": "The quick", "options": options}
    whole = api.generate(**asked, logprobs=True, top_logprobs=2)
    entries = _ollama_entries(whole.logprobs, 2)
    assert len(entries) == whole.eval_count
    streamed = []
    for part in api.generate(**asked, logprobs=True, top_logprobs=2, stream=True):
        streamed += _ollama_entries(part.logprobs, 2)
    assert [t for t, _ in streamed] == [t for t, _ in entries]
    assert [v for _, v in streamed] == pytest.approx([v for _, v in entries], abs=1e-4)
    assert api.generate(**asked).logprobs is None
    chat = api.chat(model=TINY_CHAT, messages=HELLO, options=options, logprobs=True)
    chat_entries = _ollama_entries(chat.logprobs, 0)
    assert len(chat_entries) == chat.eval_count
    streamed = []
    for part in api.chat(
        model=TINY_CHAT, messages=HELLO, options=options, logprobs=True, stream=True
    ):
        streamed += _ollama_entries(part.logprobs, 0)
    assert [t for t, _ in streamed] == [t for t, _ in chat_entries]


@pytest.mark.parametrize(
    ("body", "field"),
    [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
     ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
     ({"top_logprobs": 3}, "top_logprobs")],
)  # fmt: skip
def test_ollama_refuses_a_bad_count_naming_it(
    api: ollama.Client, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        api.generate(model=TINY, prompt="hi", options={"num_predict": 2}, **body)
    assert caught.value.status_code == 400
    assert field in caught.value.error


def test_responses_output_text_logprobs(server: RunningServer) -> None:
    body = {"model": TINY_CHAT, "input": "hi", "max_output_tokens": 4, "temperature": 0,
            "include": ["message.output_text.logprobs"], "top_logprobs": 2}  # fmt: skip
    with server.client() as http:
        whole = http.post("/v1/responses", json=body).json()
        streamed = http.post("/v1/responses", json={**body, "stream": True}).text
        bad = http.post("/v1/responses", json={**body, "top_logprobs": 30})
    part = whole["output"][0]["content"][0]
    assert len(part["logprobs"]) == whole["usage"]["output_tokens"]
    _check_entries(part["logprobs"], part["text"], 2)
    deltas, repeated = [], {}
    for line in streamed.splitlines():
        if line.startswith("data: "):
            event = json.loads(line[6:])
            if event["type"] == "response.output_text.delta":
                deltas += event["logprobs"]
            repeated[event["type"]] = event
    _same(deltas, part["logprobs"])
    # the closing events repeat the text's entries, as OpenAI's do: a client's final
    # response (the openai package's get_final_response) is response.completed's
    last = repeated.get("response.completed") or repeated["response.incomplete"]
    completed = last["response"]["output"][0]["content"][0]
    for closing in [
        repeated["response.output_text.done"]["logprobs"],
        repeated["response.content_part.done"]["part"]["logprobs"],
        repeated["response.output_item.done"]["item"]["content"][0]["logprobs"],
        completed["logprobs"],
    ]:
        assert closing == deltas
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "top_logprobs"


def test_native_infer_reports_them_in_chunks_or_the_whole_record(
    server: RunningServer,
) -> None:
    """Streamed, the chunk lines carry every entry and the terminal line repeats none
    (the stream keeps nothing it sent); whole, the record has them all."""
    body = {"model": TINY, "prompt": "The quick", "max_tokens": 6, "temperature": 0,
            "logprobs": 1}  # fmt: skip
    with server.client() as http:
        lines = [json.loads(line) for line in http.post("/infer", json=body).text.splitlines()]
        whole = http.post("/infer", json={**body, "stream": False}).json()
        refused = http.post("/infer", json={**body, "logprobs": 21})
    *chunks, last = lines
    streamed = [e for chunk in chunks for e in chunk.get("logprobs", ())]
    assert len(streamed) == last["metrics"]["completion_tokens"]
    assert "logprobs" not in last
    assert len(whole["logprobs"]) == whole["metrics"]["completion_tokens"]
    _check_entries(whole["logprobs"], whole["text"], 1)
    _same(streamed, whole["logprobs"])
    assert refused.status_code == 400
    assert "logprobs" in refused.text


def test_each_of_several_choices_has_its_own(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=TINY_CHAT, messages=HELLO, n=2, temperature=0.9, seed=3, max_tokens=6,
        logprobs=True, top_logprobs=1,
    )  # fmt: skip
    counted = 0
    for choice in answer.choices:
        content = [e.model_dump() for e in choice.logprobs.content]
        _check_entries(content, choice.message.content, 1)
        counted += len(content)
    assert counted == answer.usage.completion_tokens


def test_streamed_choices_each_count_their_own_text_offsets(client: openai.OpenAI) -> None:
    """Completions' ``text_offset`` counts within one choice's text: a streamed second
    choice starts at 0 again, as its whole answer does."""
    asked = {"model": TINY, "prompt": "The quick brown fox", "logprobs": 1, "n": 2,
             "temperature": 0.9, "seed": 5, "max_tokens": 6}  # fmt: skip
    whole = client.completions.create(**asked)
    streamed: dict[int, list[int]] = {0: [], 1: []}
    for chunk in client.completions.create(**asked, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed[choice.index] += choice.logprobs.text_offset
    for choice in whole.choices:
        assert choice.logprobs.text_offset[0] == 0
        assert streamed[choice.index] == choice.logprobs.text_offset


def test_a_request_whose_entries_could_pass_the_bound_is_a_400_naming_its_count(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
    module_server_factory: ServerFactory,
) -> None:  # fmt: skip
    """tokens (max_tokens, else the context) x n x (1 + alternatives) over
    MAX_LOGPROB_VALUES: refused before anything is queued, in every protocol, with the
    protocol's own name of the count; below it the same request is answered."""
    directory = write_chat_models(tmp_path_factory.mktemp("bound-models"))
    shutil.copyfile(tiny_model_dir / TINY, directory / TINY)
    server = module_server_factory(directory, "--n-ctx", "65536")
    client = openai_client(server)
    chat = {"model": TINY_CHAT, "messages": HELLO, "logprobs": True, "top_logprobs": 20}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**chat, n=8, max_tokens=10_000)
    assert refused.value.param == "top_logprobs"
    assert "1,048,576" in refused.value.message
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=TINY, prompt="hi", logprobs=5, n=8, max_tokens=65_536)
    assert refused.value.param == "logprobs"
    with pytest.raises(openai.BadRequestError) as refused:  # no max_output_tokens
        client.responses.create(model=TINY_CHAT, input="hi", top_logprobs=20)
    assert refused.value.param == "top_logprobs"
    with ollama.Client(host=server.base_url, timeout=60) as api:
        with pytest.raises(ollama.ResponseError) as caught:
            api.generate(
                model=TINY, prompt="hi", logprobs=True, top_logprobs=20,
                options={"num_predict": 60_000},
            )  # fmt: skip
        assert caught.value.status_code == 400
        assert "logprobs" in caught.value.error
    with server.client() as http:
        infer = http.post("/infer", json={"model": TINY, "prompt": "hi", "logprobs": 20,
                                          "max_tokens": None})  # fmt: skip
        assert infer.status_code == 400
        assert infer.json()["error"]["field"] == "logprobs"
        assert http.get("/status").json()["instances"] == []  # nothing was loaded
    answer = client.chat.completions.create(**chat, n=8, max_tokens=4)
    assert all(len(c.logprobs.content[0].top_logprobs) == 20 for c in answer.choices)
