"""OpenAI's ``n`` through the real ``openai`` client against a real ``modeld serve``:
whole and streamed, on chat and completions; the choices run one after another on one
admission, the prompt evaluated once; a client that leaves mid-way stops the rest; bad
values are a 400 naming ``n``."""

from __future__ import annotations

import re
import shutil
from collections import defaultdict
from pathlib import Path

import openai
import pytest

from tests.http.test_observability import metric, scrape
from tests.support.http import ServerFactory
from tests.support.openai_clients import TINY_CHAT, openai_client, sse_data
from tests.support.poll import poll
from tests.support.server import RunningServer
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

HELLO = [{"role": "user", "content": "hello world"}]
PLAIN = "tiny-a.gguf"
LONG = "tiny-long.gguf"  # a context of 8192: a choice that runs to its end takes a while


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path,
           module_server_factory: ServerFactory) -> RunningServer:  # fmt: skip
    directory = tmp_path_factory.mktemp("openai-choices")
    write_tiny_gguf(directory / TINY_CHAT, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))
    shutil.copyfile(tiny_model_dir / PLAIN, directory / PLAIN)
    write_tiny_gguf(directory / LONG, TinyModelSpec(seed=1, context_length=8192))
    return module_server_factory(directory, "--n-ctx", "8192")


@pytest.fixture(scope="module")
def client(server: RunningServer) -> openai.OpenAI:
    return openai_client(server)


def _by_index(chunks: list[object]) -> dict[int, list[object]]:
    """A stream's choice chunks by their index (usage chunks have none)."""
    grouped: dict[int, list[object]] = defaultdict(list)
    for chunk in chunks:
        for choice in chunk.choices:  # type: ignore[attr-defined]
            grouped[choice.index].append(choice)
    return grouped


def test_streamed_chat_choices_each_from_role_to_finish(client: openai.OpenAI) -> None:
    """Each choice: its role chunk, its deltas, its own finish chunk, under its index,
    one after another; the usage of all choices once at the end; the texts are the
    whole answer's (seed + i per choice)."""
    ask = {"model": TINY_CHAT, "messages": HELLO, "max_tokens": 6, "n": 3, "seed": 11,
           "temperature": 1.0}  # fmt: skip
    whole = client.chat.completions.create(**ask)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})  # type: ignore[call-overload]
    )
    order = [choice.index for chunk in chunks for choice in chunk.choices]
    assert order == sorted(order)  # the choices do not interleave
    choices = _by_index(chunks)
    assert sorted(choices) == [0, 1, 2]
    for index, parts in choices.items():
        assert parts[0].delta.role == "assistant"
        assert [p.finish_reason for p in parts] == [None] * (len(parts) - 1) + ["length"]
        text = "".join(p.delta.content or "" for p in parts)
        assert text == whole.choices[index].message.content
    assert len({whole.choices[i].message.content for i in range(3)}) > 1
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage is not None
    assert whole.usage is not None
    assert usage.completion_tokens == 18 == whole.usage.completion_tokens
    assert usage.prompt_tokens == whole.usage.prompt_tokens  # counted once
    assert usage.total_tokens == usage.prompt_tokens + 18
    assert all(chunk.usage is None for chunk in chunks[:-1])
    assert len({chunk.id for chunk in chunks}) == 1


def test_streamed_completion_choices(client: openai.OpenAI) -> None:
    ask = {"model": PLAIN, "prompt": "once upon", "max_tokens": 5, "n": 2, "seed": 3}
    whole = client.completions.create(**ask)  # type: ignore[call-overload]
    chunks = list(client.completions.create(**ask, stream=True))  # type: ignore[call-overload]
    choices = _by_index(chunks)
    assert sorted(choices) == [0, 1]
    for index, parts in choices.items():
        assert [p.finish_reason for p in parts][-1] == "length"
        assert "".join(p.text for p in parts) == whole.choices[index].text
    assert [c.index for c in whole.choices] == [0, 1]
    assert [c.finish_reason for c in whole.choices] == ["length", "length"]


def test_the_wire_ends_once_with_one_done(server: RunningServer) -> None:
    body = {"model": TINY_CHAT, "messages": HELLO, "max_tokens": 3, "n": 4, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with server.client() as http:
        response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    events = sse_data(response.text)
    assert events.count("[DONE]") == 1
    assert events[-1] == "[DONE]"
    chunks = [e for e in events if isinstance(e, dict)]
    finishes = [
        c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finishes == [
        {"index": i, "delta": {}, "logprobs": None, "finish_reason": "length"} for i in range(4)
    ]
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"] and
             c["choices"][0]["delta"].get("role") == "assistant"]  # fmt: skip
    assert roles == [0, 1, 2, 3]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 12


def test_choices_after_the_first_reuse_the_prompt(
    client: openai.OpenAI, server: RunningServer
) -> None:
    """Every choice after the first evaluates only the prompt's last token: the server
    counts their cached tokens (``modeld_prompt_tokens_cached``, one count per choice)
    on top of what the first choice found."""
    model = {"model": TINY_CHAT}
    with server.client() as http:
        before = metric(scrape(http), "modeld_prompt_tokens_cached_total", **model)
    messages = [{"role": "user", "content": "a fresh prompt about choices " * 3}]
    chat = client.chat.completions.create(
        model=TINY_CHAT,
        messages=messages,
        max_tokens=4,
        n=3,  # type: ignore[arg-type]
    )
    with server.client() as http:
        after = metric(scrape(http), "modeld_prompt_tokens_cached_total", **model)
    assert chat.usage is not None
    assert chat.usage.prompt_tokens_details is not None
    first = chat.usage.prompt_tokens_details.cached_tokens or 0
    assert first < chat.usage.prompt_tokens - 1  # the first evaluated the new prompt
    assert after - before == first + 2 * (chat.usage.prompt_tokens - 1)


def test_a_client_leaving_during_a_choice_starts_no_other(
    client: openai.OpenAI, server: RunningServer
) -> None:
    def finished() -> float:
        with server.client() as http:
            samples = scrape(http)
        return sum(v for k, v in samples.items()
                   if k.startswith("modeld_generations_total{") and f'"{LONG}"' in k)  # fmt: skip

    before = finished()
    stream = client.completions.create(model=LONG, prompt="leave early", n=3, stream=True)
    first = next(iter(stream))
    assert first.choices[0].index == 0
    stream.close()  # the client leaves during choice 0
    poll(finished, lambda n: n >= before + 1, what="the cancelled choice is counted")

    def idle() -> bool:
        with server.client() as http:
            status = http.get("/status").json()
        return all(i["inflight"] == 0 for i in status["instances"])

    poll(idle, what="the model is idle")
    assert finished() == before + 1  # choices 1 and 2 never started
    again = client.completions.create(model=LONG, prompt="hi", max_tokens=2, n=2)
    assert [c.finish_reason for c in again.choices] == ["length", "length"]


@pytest.mark.parametrize("n", [0, 9, "2", 1.5, -1])
def test_bad_n_is_a_400_naming_n(client: openai.OpenAI, n: object) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=PLAIN, prompt="hi", max_tokens=2, extra_body={"n": n})
    assert caught.value.param == "n", caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=TINY_CHAT, messages=HELLO, max_tokens=2, stream=True, extra_body={"n": n}
        )  # type: ignore[call-overload]
    assert caught.value.param == "n", caught.value.message
    assert re.search(r"\bn\b", caught.value.message)
