"""``LlamaEngine`` on real llama.cpp: the sizes it creates its context with are the ones
the memory estimate budgets for, and ``prepare``/``generate`` keep their contract."""

from __future__ import annotations

import ctypes
import re
from collections.abc import Iterator
from pathlib import Path

import llama_cpp
import pytest

from modeld.engine import llama_load
from modeld.engine.base import EngineClosed, StopCode, TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.errors import ContextLengthExceeded, InvalidRequest
from modeld.gguf import read_gguf_header
from modeld.memory.estimate import estimate_footprint, graph_buffer_bytes
from modeld.sizes import MIB
from modeld.types import SamplingParams, context_sizes
from tests.support.tiny_gguf import TinyModelSpec, write_tiny_gguf


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = TinyModelSpec(n_embd=128, n_layer=2, n_head=4, n_head_kv=2, n_ff=256,
                         context_length=4096)  # fmt: skip
    return write_tiny_gguf(tmp_path_factory.mktemp("long-ctx") / "long.gguf", spec)


def load_capturing_logs(
    path: Path, settings: EngineSettings, loop: TokenLoop
) -> tuple[LlamaEngine, str]:
    lines: list[str] = []

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def capture(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        header = read_gguf_header(path)
        engine = LlamaEngine(path, settings, loop, header.context_length)
    finally:
        llama_cpp.llama_log_set(llama_load.route_llama_log, ctypes.c_void_p(0))
    return engine, "".join(lines)


@pytest.mark.parametrize(("n_ctx", "n_batch"), [(2048, 1024), (1024, 2048), (2048, 512)])
def test_the_estimate_budgets_the_sizes_the_engine_creates(
    long_context_model: Path, loop: TokenLoop, n_ctx: int, n_batch: int
) -> None:
    """With ``--n-batch`` above 512 the engine's micro-batch (and so its compute buffer)
    grows; an estimate with its own rule would undercount it."""
    settings = EngineSettings(n_ctx=n_ctx, n_batch=n_batch, n_threads=1, n_gpu_layers=0)
    engine, log = load_capturing_logs(long_context_model, settings, loop)
    try:
        ctx = engine._llama.ctx
        created = (
            llama_cpp.llama_n_ctx(ctx),
            llama_cpp.llama_n_batch(ctx),
            llama_cpp.llama_n_ubatch(ctx),
        )
    finally:
        engine.close()
    header = read_gguf_header(long_context_model)
    sizes = context_sizes(n_ctx, n_batch, header.context_length)
    estimate = estimate_footprint(
        header, n_ctx=sizes.n_ctx, n_batch=sizes.n_batch, n_gpu_layers=0, gpu=False
    )
    assert created == (estimate.kv_cells, sizes.n_batch, estimate.n_ubatch_tokens)
    reported_mib = float(re.findall(r"CPU compute buffer size\s*=\s*([\d.]+) MiB", log)[0])
    reserved = graph_buffer_bytes(
        header,
        kv_cells=estimate.kv_cells,
        n_ubatch=estimate.n_ubatch_tokens,
        n_outputs=estimate.n_ubatch_tokens,
    )
    assert 0.99 <= reserved / MIB / reported_mib <= 1.12, (reserved / MIB, reported_mib)


@pytest.fixture
def engine(tiny_model_path: Path, loop: TokenLoop) -> Iterator[LlamaEngine]:
    settings = EngineSettings(n_ctx=256, n_batch=64, n_threads=1, n_gpu_layers=0)
    engine = LlamaEngine(tiny_model_path, settings, loop, 512)
    yield engine
    engine.close()


def test_max_tokens_past_the_context_is_a_cap_and_a_prompt_too_long_an_error(
    engine: LlamaEngine,
) -> None:
    """As in Ollama and llama-server: ``max_tokens`` larger than what is left of the
    context stops generation at the context's end (``length``); a prompt that alone
    does not fit is ``context_length_exceeded``."""
    tokens = engine.prepare("hello world", max_tokens=256)
    assert tokens[0] == 1  # BOS
    ring = engine.new_ring()
    params = SamplingParams(max_tokens=256, temperature=0.0)
    outcome = engine.generate(ring, tokens, params)
    ring.close()
    assert outcome.stop_code is StopCode.LENGTH
    assert outcome.completion_tokens == engine.n_ctx - len(tokens)
    with pytest.raises(ContextLengthExceeded) as too_long:
        engine.prepare("hello " * 200, max_tokens=1)
    assert too_long.value.field == "prompt"
    assert too_long.value.code == "context_length_exceeded"


def test_a_truncated_prompt_keeps_its_end_and_room_to_generate(engine: LlamaEngine) -> None:
    """Ollama's truncation of a raw prompt: the BOS, then the last tokens that leave
    ``max_tokens`` of room."""
    text = " ".join(f"w{i}" for i in range(400))
    whole = engine.tokenizer.raw(text.encode(), 4096, True, parse_special=True)[1]
    assert len(whole) > engine.n_ctx
    kept = engine.prepare(text, max_tokens=32, truncate=True)
    assert kept[0] == 1
    assert len(kept) == engine.n_ctx - 32
    assert kept[1:] == whole[len(whole) - len(kept) + 1 :]
    short = engine.prepare("hello world", max_tokens=32, truncate=True)
    assert short == engine.prepare("hello world")  # what fits is untouched


def test_a_prompt_over_the_byte_budget_is_refused_by_its_length(engine: LlamaEngine) -> None:
    """No token of this vocabulary stands for more than a few bytes, so a prompt longer
    than n_ctx of them cannot fit, whatever the tokenizer would make of it."""
    longest = len(" 日本".encode())  # the piece "▁日本", rendered: 7 bytes
    assert engine.max_prompt_bytes == engine.n_ctx * longest
    with pytest.raises(InvalidRequest) as caught:
        engine.prepare("x" * (engine.max_prompt_bytes + 1), max_tokens=1)
    assert caught.value.field == "prompt"
    assert "bytes" in caught.value.message


def test_generate_finishes_its_ring_and_a_closed_engine_refuses_work(
    engine: LlamaEngine,
) -> None:
    tokens = engine.prepare("hello", max_tokens=4)
    ring = engine.new_ring()
    outcome = engine.generate(ring, tokens, SamplingParams(max_tokens=4, temperature=0.0))
    assert outcome.stop_code is StopCode.LENGTH
    assert ring.drain()[2]  # finished, by generate itself
    ring.close()
    engine.close()
    with pytest.raises(EngineClosed):
        engine.prepare("hello", max_tokens=4)
    ring = engine.new_ring()
    outcome = engine.generate(ring, tokens, SamplingParams(max_tokens=4))
    assert outcome.stop_code is StopCode.ERROR
    assert ring.drain()[2]
    ring.close()
