"""``LlamaEngine``'s chat and embeddings on real llama.cpp: a conversation becomes exactly
the tokens of its rendered text (one BOS, control tokens parsed), whichever template
renders it; embeddings come from a second context on the same weights, equal to what
llama-cpp-python's own embedding model computes, and cost what the budget charges."""

from __future__ import annotations

import ctypes
import math
import re
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest
from llama_cpp import Llama

from modeld.engine import llama_load
from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.chat_format import builtin_chat_templates, render_builtin
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.errors import (
    ChatTemplateError,
    ClientDisconnected,
    ContextLengthExceeded,
    InvalidRequest,
    NoChatTemplate,
)
from modeld.gguf import read_gguf_header
from modeld.memory.estimate import embedding_context_bytes
from modeld.sizes import MIB
from modeld.types import ChatMessage, SamplingParams
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

HELLO = [ChatMessage("system", "be brief"), ChatMessage("user", "hello world")]
SETTINGS = EngineSettings(n_ctx=256, n_batch=64, n_threads=1, n_gpu_layers=0)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat-model") / "tiny-chat.gguf"
    return write_tiny_gguf(path, TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE))


@pytest.fixture
def chat_engine(chat_model: Path, loop: TokenLoop) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(chat_model, SETTINGS, loop, 512)
    yield engine
    engine.close()


@pytest.fixture
def plain_engine(tiny_model_path: Path, loop: TokenLoop) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(tiny_model_path, SETTINGS, loop, 512)
    yield engine
    engine.close()


def test_the_gguf_template_gives_one_bos(chat_engine: LlamaEngine) -> None:
    """The template writes ``<s>`` itself: no second one is added."""
    tokens = chat_engine.prepare_chat(HELLO, 8, None)
    rendered = "<s><|system|>\nbe brief\n<|user|>\nhello world\n<|assistant|>\n"
    assert tokens == chat_engine.prepare(rendered.removeprefix("<s>"), 8)
    assert tokens.count(1) == 1
    assert chat_engine.prepare(rendered, 8) == [1, *tokens]  # as /infer would read it


def test_a_builtin_template_overrides_and_gets_the_vocabularys_bos(
    plain_engine: LlamaEngine,
) -> None:
    assert {"gemma", "chatml", "llama3"} <= builtin_chat_templates()
    text = render_builtin("chatml", HELLO, 10_000)
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhello world<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert plain_engine.prepare_chat(HELLO, 8, "chatml") == plain_engine.prepare(text, 8)
    with pytest.raises(ChatTemplateError, match=r"not a llama\.cpp built-in"):
        plain_engine.prepare_chat(HELLO, 8, "no-such-template")


def test_a_template_file_overrides_the_models_own(chat_engine: LlamaEngine, tmp_path: Path) -> None:
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}{{ m.content }};{% endfor %}")
    assert chat_engine.prepare_chat(HELLO, 8, str(template)) == chat_engine.prepare(
        "be brief;hello world;", 8
    )
    with pytest.raises(ChatTemplateError, match="not a readable regular file"):
        chat_engine.prepare_chat(HELLO, 8, str(tmp_path / "missing.jinja"))


def test_no_template_is_no_chat(plain_engine: LlamaEngine) -> None:
    with pytest.raises(NoChatTemplate) as caught:
        plain_engine.prepare_chat(HELLO, 8, None)
    assert caught.value.code == "no_chat_template"
    assert caught.value.field == "messages"


def test_without_max_tokens_the_context_is_the_limit(chat_engine: LlamaEngine) -> None:
    tokens = chat_engine.prepare_chat(HELLO, None, None)
    ring = chat_engine.new_ring()
    outcome = chat_engine.generate(ring, tokens, SamplingParams(max_tokens=None, temperature=0))
    ring.close()
    assert outcome.stop_code is StopCode.LENGTH
    assert outcome.completion_tokens == chat_engine.n_ctx - len(tokens)
    long_chat = [ChatMessage("user", "hello " * 250)]
    with pytest.raises(ContextLengthExceeded) as caught:
        chat_engine.prepare_chat(long_chat, None, None)
    assert caught.value.field == "messages"


def test_a_truncated_chat_keeps_the_system_message_and_the_latest_turns(
    chat_engine: LlamaEngine,
) -> None:
    """Ollama's truncation: the oldest turns go, the system message and the most recent
    turns stay, and what is kept leaves ``max_tokens`` of room."""
    turns = [ChatMessage("system", "be brief")]
    for index in range(40):
        role = "user" if index % 2 == 0 else "assistant"
        turns.append(ChatMessage(role, f"turn {index} " + "hello " * 6))  # type: ignore[arg-type]
    with pytest.raises(ContextLengthExceeded):
        chat_engine.prepare_chat(turns, 32, None)
    kept = chat_engine.prepare_chat(turns, 32, None, truncate=True)
    budget = chat_engine.n_ctx - 32
    fitting = [start for start in range(1, len(turns)) if _fits(chat_engine, turns, start, budget)]
    assert fitting[0] > 1  # some turns went
    assert kept == chat_engine.prepare_chat([turns[0], *turns[fitting[0] :]], 32, None)
    alone = [ChatMessage("system", "be brief"), ChatMessage("user", "hello " * 250)]
    with pytest.raises(ContextLengthExceeded) as caught:
        chat_engine.prepare_chat(alone, 32, None, truncate=True)
    assert caught.value.field == "messages"


def _fits(engine: LlamaEngine, turns: list[ChatMessage], start: int, budget: int) -> bool:
    try:
        return len(engine.prepare_chat([turns[0], *turns[start:]], 32, None)) <= budget
    except ContextLengthExceeded:
        return False


def test_embeddings_are_normalised_and_deterministic(plain_engine: LlamaEngine) -> None:
    vectors, tokens = plain_engine.embed(["hello", "the world", "hello"], lambda: False)
    assert len(vectors) == 3
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, abs_tol=1e-6) for v in vectors)
    assert vectors[0] == vectors[2]
    assert vectors[0] != vectors[1]
    raw = plain_engine.tokenizer.raw
    assert tokens == sum(len(raw(t.encode(), 64, True, parse_special=False)[1])
                         for t in ["hello", "the world", "hello"])  # fmt: skip


def test_an_embedding_input_is_one_batch_at_most(plain_engine: LlamaEngine) -> None:
    assert plain_engine.embedding_tokens == 64  # SETTINGS.n_batch
    with pytest.raises(InvalidRequest) as caught:
        plain_engine.embed(["ok", "hello " * 100], lambda: False)
    assert caught.value.field == "input"
    assert "input 1" in caught.value.message
    assert not plain_engine._embedding.made  # checked before anything was made


def test_embedding_inputs_as_token_ids_and_truncated(plain_engine: LlamaEngine) -> None:
    """Token ids embed as the text they came from; an id outside the vocabulary is a
    400; ``truncate`` keeps an input's first batch of tokens."""
    ids = plain_engine.tokenizer.raw(b"the world", 64, True, parse_special=False)[1]
    (from_text, from_ids), count = plain_engine.embed(["the world", ids], lambda: False)
    assert from_ids == from_text
    assert count == 2 * len(ids)
    with pytest.raises(InvalidRequest) as caught:
        plain_engine.embed([[1, plain_engine.tokenizer.n_vocab]], lambda: False)
    assert "vocabulary" in caught.value.message
    long_text = "hello " * 100
    with pytest.raises(ContextLengthExceeded):
        plain_engine.embed([long_text], lambda: False)
    (cut,), count = plain_engine.embed([long_text], lambda: False, truncate=True)
    assert count == 64
    head = plain_engine.tokenizer.raw(long_text.encode(), 2000, True, parse_special=False)[1]
    (expected,), _ = plain_engine.embed([head[:64]], lambda: False)
    assert cut == expected


def test_a_cancelled_embedding_stops_between_inputs(plain_engine: LlamaEngine) -> None:
    asked: list[int] = []

    def cancelled() -> bool:
        asked.append(1)
        return len(asked) > 2

    with pytest.raises(ClientDisconnected):
        plain_engine.embed(["a", "b", "c", "d"], cancelled)
    assert len(asked) == 3
    vectors, _ = plain_engine.embed(["a"], lambda: False)  # and it still works
    assert len(vectors) == 1


def test_the_embedding_context_shares_the_weights_and_matches_llama_cpp_python(
    tiny_model_path: Path, loop: TokenLoop
) -> None:
    """A separate ``Llama(embedding=True)`` loads the weights again; ours does not, and
    its vectors are that model's, mean-pooled and normalised (up to thread numerics)."""
    engine = LlamaEngine(tiny_model_path, SETTINGS, loop, 512)
    reference = Llama(
        str(tiny_model_path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
        n_ctx=64, n_batch=64, n_ubatch=64, n_threads=1, verbose=False,
    )  # fmt: skip
    try:
        ours, _ = engine.embed(["hello world and the"], lambda: False)
        theirs = reference.embed("hello world and the", normalize=True)
    finally:
        reference.close()
        engine.close()
    cosine = sum(a * b for a, b in zip(ours[0], theirs, strict=True))  # type: ignore[arg-type]
    assert cosine > 0.9999


@pytest.mark.parametrize(
    "model", ["tiny", pytest.param("gemma", marks=pytest.mark.slow)], ids=["tiny", "gemma"]
)
def test_the_budget_charges_what_the_embedding_context_takes(
    model: str, tiny_model_path: Path, gemma_path: Path, loop: TokenLoop
) -> None:
    """llama.cpp's own sizes for the embedding context (KV, compute buffer) plus every
    token's logits of a full-length input: the estimate covers them, not by much more."""
    path = tiny_model_path if model == "tiny" else gemma_path
    settings = EngineSettings(n_ctx=1024, n_batch=128, n_threads=2, n_gpu_layers=0)
    header = read_gguf_header(path)
    engine = LlamaEngine(path, settings, loop, header.context_length)
    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        engine.embed(["hello"], lambda: False)
    finally:
        llama_cpp.llama_log_set(llama_load.route_llama_log, ctypes.c_void_p(0))
        engine.close()
    log = "".join(lines)
    kv = sum(float(x) for x in re.findall(r"CPU KV buffer size\s*=\s*([\d.]+) MiB", log))
    compute = float(re.findall(r"CPU compute buffer size\s*=\s*([\d.]+) MiB", log)[0])
    outputs = 128 * (header.n_vocab + header.embedding_length) * 4 / MIB  # a full input
    actual_mib = kv + compute + outputs
    estimate_mib = embedding_context_bytes(header, n_tokens=128, n_gpu_layers=0, gpu=False) / MIB
    assert actual_mib <= estimate_mib <= actual_mib * 1.15 + 3, (estimate_mib, actual_mib)
