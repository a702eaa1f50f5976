"""The real Gemma 3 270M through the ``openai`` client: chat with llama.cpp's built-in
``gemma`` template (the bundled model is the base model, without a template of its own),
structured output with ``parse()``, embeddings, a stream cut short by an eviction, and
the client's retries of 429 and 503."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import openai
import pydantic
import pytest

from modeld.gguf import read_gguf_header
from modeld.memory.estimate import estimate_footprint
from modeld.sizes import MIB
from tests.support.http import GEMMA, GEMMA_FLAGS, LONG_STORY, ServerFactory, instance_of, poll
from tests.support.openai_clients import TINY_CHAT, answered, openai_client, write_chat_models
from tests.support.server import RunningServer

pytestmark = pytest.mark.slow

QUESTION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
]
STORY = [{"role": "user", "content": "Tell a long story about the sea."}]
CONFIG = f'[models."{GEMMA}"]\naliases = ["gemma"]\nchat_template = "gemma"\n'


@pytest.fixture
def gemma_server(start_server: ServerFactory, gemma_dir: Path) -> RunningServer:
    """Without prompt reuse: these tests ask the same question twice and compare the
    answers token for token, and an answer on a reused prefix evaluates the prompt's last
    token alone, whose logits llama.cpp does not promise bit-identical (this base model's
    near-tied greedy choice here does differ; docs/c-extension.md)."""
    (gemma_dir / "modeld.toml").write_text(CONFIG)
    config = ("--config", str(gemma_dir / "modeld.toml"))
    return start_server(gemma_dir, *GEMMA_FLAGS, *config, "--no-prompt-reuse")


class Person(pydantic.BaseModel):
    name: str
    age: int


def test_gemma_chats_with_the_builtin_template(gemma_server: RunningServer) -> None:
    client = openai_client(gemma_server)
    whole = client.chat.completions.create(
        model="gemma",
        messages=QUESTION,
        max_completion_tokens=24,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model="gemma", messages=QUESTION, max_completion_tokens=24, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content
    assert text == whole.choices[0].message.content
    assert whole.choices[0].finish_reason in {"stop", "length"}
    assert chunks[-1].usage == whole.usage
    assert whole.model == GEMMA
    # The template folds the system message into the first user turn; the chat is /infer
    # on that text, token for token (one BOS, the turn markers parsed as control tokens).
    rendered = (
        "<start_of_turn>user\nYou are terse.\n\nWhat is the capital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    with gemma_server.client() as http:
        infer = http.post(
            "/infer",
            json={"prompt": rendered, "max_tokens": 24, "temperature": 0, "stream": False},
        ).json()
    assert whole.usage is not None
    assert whole.usage.prompt_tokens == infer["metrics"]["prompt_tokens"]
    assert text == infer["text"]


def test_parse_with_a_pydantic_model(gemma_server: RunningServer) -> None:
    client = openai_client(gemma_server)
    completion = client.chat.completions.parse(
        model="gemma",
        messages=[{"role": "user", "content": "Invent a person: name and age."}],
        response_format=Person,
        max_completion_tokens=64,
        temperature=0,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)


def test_gemma_embeddings(gemma_server: RunningServer) -> None:
    client = openai_client(gemma_server)
    texts = ["The sea is blue.", "The ocean is blue.", "Taxes are due in April."]
    base64_default = client.embeddings.create(model="gemma", input=texts)
    floats = client.embeddings.create(model="gemma", input=texts, encoding_format="float")
    vectors = [d.embedding for d in floats.data]
    for a, b in zip(base64_default.data, floats.data, strict=True):
        assert len(a.embedding) == 640
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
        assert math.sqrt(sum(x * x for x in a.embedding)) == pytest.approx(1.0, abs=1e-5)

    def cosine(u: list[float], v: list[float]) -> float:
        return sum(x * y for x, y in zip(u, v, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    with gemma_server.client() as http:
        instance = instance_of(http, GEMMA)
    assert instance is not None  # the embedding context shares the loaded weights
    assert instance["loads_total"] == 1


@pytest.mark.parametrize("api", ["chat", "completions", "responses"])
def test_an_eviction_mid_stream_raises_in_the_client(gemma_server: RunningServer, api: str) -> None:
    client = openai_client(gemma_server)
    if api == "chat":
        stream: object = client.chat.completions.create(
            model="gemma",
            messages=STORY,
            max_tokens=900,
            stream=True,  # type: ignore[arg-type]
        )
    elif api == "completions":
        stream = client.completions.create(
            model="gemma", prompt=str(LONG_STORY["prompt"]), max_tokens=900, stream=True
        )
    else:
        stream = client.responses.create(
            model="gemma", input="Tell a long story.", max_output_tokens=900, stream=True
        )
    events = iter(stream)  # type: ignore[call-overload]
    next(events)
    with gemma_server.client() as http:
        assert http.delete(f"/models/{GEMMA}/instance").status_code == 200
    with pytest.raises(openai.APIError) as caught:
        for _ in events:
            pass
    assert caught.value.code == "evicted"


def _gemma_charge_mb(gemma_path: Path) -> float:
    """The budget a loaded Gemma is charged at least (the load reserves this)."""
    header = read_gguf_header(gemma_path)
    return (
        estimate_footprint(header, n_ctx=1024, n_gpu_layers=-1, n_batch=512, gpu=False).total_bytes
        / MIB
    )


def test_429_and_503_are_retried_by_the_client_after_retry_after(
    start_server: ServerFactory, gemma_dir: Path, gemma_path: Path
) -> None:
    """Gemma is busy with a long story; its queue takes nobody (429 queue_full), and the
    budget leaves no room for a second model while it is busy (503 memory_busy): the
    client tries each three times, one Retry-After apart, then raises."""
    write_chat_models(gemma_dir)
    budget_mb = math.ceil(_gemma_charge_mb(gemma_path)) + 2  # no room for a tiny one too
    # No probe load: a first probe of the tiny file (a child process, about a second)
    # would outlast --max-wait-ms and make the first attempt a 429 queue_timeout.
    server = start_server(
        gemma_dir, *GEMMA_FLAGS, "--vram-budget-mb", str(budget_mb), "--vram-margin-mb", "0",
        "--max-queue-depth", "0", "--max-wait-ms", "300", "--no-probe-load",
    )  # fmt: skip
    # Busy for a minute, whatever the model would say: the grammar forbids its EOS until
    # 500 numbers are written (and checking 262k tokens a step makes each one slow).
    numbers = {"type": "array", "items": {"type": "integer"}, "minItems": 500}
    with server.client() as http:  # loaded first: --max-wait-ms bounds a wait for a load too
        assert http.post(f"/models/{GEMMA}/load").status_code == 200
    busy = server.open_infer({**LONG_STORY, "model": GEMMA, "format": numbers})
    try:
        with server.client() as http:
            poll(lambda: instance_of(http, GEMMA), lambda i: bool(i and i["inflight"]))
        client = openai_client(server)
        with pytest.raises(openai.RateLimitError) as full:
            client.chat.completions.create(model=GEMMA, messages=STORY, max_tokens=4)  # type: ignore[arg-type]
        assert full.value.code == "queue_full"
        assert full.value.response.headers["retry-after"] == "1"
        assert answered(server, "/v1/chat/completions", 429) == 3
        with pytest.raises(openai.InternalServerError) as busy_memory:
            client.chat.completions.create(model=TINY_CHAT, messages=STORY, max_tokens=4)  # type: ignore[arg-type]
        assert busy_memory.value.status_code == 503
        assert busy_memory.value.code == "memory_busy"
        assert int(busy_memory.value.response.headers["retry-after"]) >= 1
        assert answered(server, "/v1/chat/completions", 503) == 3
        with server.client() as http:
            still = instance_of(http, GEMMA)
        assert still is not None
        assert still["inflight"] == 1  # the story went on throughout
    finally:
        busy.close()


def test_the_demo_chats_with_gemma(gemma_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``modeld serve --demo``'s settings give the bundled model the ``gemma`` template."""
    # the module, not the function modeld.cli re-exports under the same name
    cli = importlib.import_module("modeld.cli.main")
    from modeld.settings.config import load_settings

    monkeypatch.setattr(cli, "DEMO_DIR", gemma_path.parent)  # assembled there already
    settings = cli._prepare_demo(load_settings({}, env={}))
    own = settings.model(GEMMA)
    assert own.chat_template == "gemma"
    assert settings.resolve_model_name(cli.DEMO_ALIAS) == GEMMA
    assert settings.default_model == GEMMA
