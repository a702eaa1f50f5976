"""The engine contract's one hand-over (engine/contract.py ``run_request``) on a real
tiny model, on both loops: a request is prepared and generated in one call on the
worker, the preparation is signalled before the first token, and a ring cancelled while
the request was being prepared evaluates nothing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.contract import Engine, Recipe, run_request
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.worker import EngineWorker
from modeld.errors import InvalidRequest, NoChatTemplate
from modeld.types import ChatMessage, ChatRequest, InferRequest

SETTINGS = EngineSettings(n_ctx=256, n_batch=64, n_threads=1, n_gpu_layers=0)
ASK = InferRequest(prompt="hello there", max_tokens=4, temperature=0.0)


@pytest.fixture
def engine(tiny_model_path: Path, loop: TokenLoop) -> Iterator[LlamaEngine]:
    engine = LlamaEngine(tiny_model_path, SETTINGS, loop, 512)
    yield engine
    engine.close()


def test_the_llama_engine_is_an_engine(engine: LlamaEngine) -> None:
    as_contract: Engine = engine  # mypy checks the protocol; this checks the sizes are real
    assert as_contract.sizes.n_ctx == 256
    assert as_contract.model_size_bytes > 0


def test_one_hand_over_prepares_signals_then_generates(engine: LlamaEngine) -> None:
    ring = engine.new_ring()
    seen: list[bytes] = []

    def prepared() -> None:  # before any token: the ring is still empty
        seen.append(ring.drain()[0])

    try:
        outcome = run_request(engine, ASK, Recipe(), ring, prepared)
        text, _, finished = ring.drain()
    finally:
        ring.close()
    assert seen == [b""]
    assert finished
    assert outcome.stop_code is StopCode.LENGTH
    assert outcome.prompt_tokens == len(engine.prepare(ASK.prompt, ASK.max_tokens))
    assert outcome.completion_tokens == 4
    assert text


def test_a_ring_cancelled_during_preparation_evaluates_nothing(engine: LlamaEngine) -> None:
    ring = engine.new_ring()
    try:
        outcome = run_request(engine, ASK, Recipe(), ring, ring.cancel)
        text, _, finished = ring.drain()
    finally:
        ring.close()
    assert outcome.stop_code is StopCode.CANCELLED
    assert (outcome.completion_tokens, outcome.prompt_eval_ms, text) == (0, 0.0, b"")
    assert finished  # the consumer still sees the end


def test_a_request_refused_while_prepared_is_never_signalled(engine: LlamaEngine) -> None:
    ring = engine.new_ring()
    signals: list[None] = []
    too_long = InferRequest(prompt="hello " * 2000, max_tokens=4)
    chat = ChatRequest(messages=(ChatMessage("user", "hi"),), max_tokens=4)
    try:
        with pytest.raises(InvalidRequest) as refused:
            run_request(engine, too_long, Recipe(), ring, lambda: signals.append(None))
        assert refused.value.field == "prompt"
        assert refused.value.code == "context_length_exceeded"
        with pytest.raises(InvalidRequest) as bad_grammar:
            run_request(engine, ASK, Recipe(grammar="root ::= ("), ring, lambda: None)
        assert bad_grammar.value.field == "format"
        # tiny-a has no chat template and none is configured: refused before generating
        with pytest.raises(NoChatTemplate):
            run_request(engine, chat, Recipe(), ring, lambda: signals.append(None))
    finally:
        ring.close()
    assert signals == []


@pytest.mark.anyio
async def test_a_worker_call_is_awaited_at_its_signal_and_at_its_end() -> None:
    worker = EngineWorker("test-signal")
    try:
        signalling = worker.submit_signalling(lambda signal: (signal(), "done")[1])
        assert await signalling.signalled() is True
        assert await signalling.wait() == "done"
        silent = worker.submit_signalling(lambda signal: "no signal")
        assert await silent.signalled() is False
        failing = worker.submit_signalling(lambda signal: 1 // 0)
        with pytest.raises(ZeroDivisionError):
            await failing.signalled()
    finally:
        await worker.shutdown()
