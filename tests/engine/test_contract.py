"""The engine contract's one hand-over (engine/contract.py ``run_request``) on a real
tiny model, on both loops: a request is prepared and generated in one call on the
worker, the preparation is signalled before the first token, and a ring cancelled while
the request was being prepared evaluates nothing."""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
from llama_cpp import Llama

from modeld.engine.base import StopCode, TokenLoop
from modeld.engine.contract import Engine, Recipe, run_request
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.engine.worker import EngineWorker
from modeld.errors import InvalidRequest, NoChatTemplate
from modeld.types import ChatMessage, ChatRequest, InferRequest, SamplingParams

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


@pytest.mark.parametrize("asked", [True, False], ids=["asked", "not-asked"])
def test_the_loop_wakes_a_ring_that_asked_as_it_starts_before_any_token(
    loop: TokenLoop, tiny_llama: Llama, asked: bool
) -> None:
    """The scheduler's "prepared" wake: the C loop gives it once it has let go of the
    GIL, the Python loop as it starts; a ring cancelled first shows it with nothing in
    it (and the loop evaluates nothing)."""
    ring = loop.new_ring()
    try:
        if asked:
            ring.wake_at_start()
        ring.cancel()
        tokens = tiny_llama.tokenize(b"hello there")
        outcome = loop.run(tiny_llama, ring, tokens, SamplingParams(max_tokens=4))
        readable = bool(select.select([ring.fileno()], [], [], 0)[0])
        drained = ring.drain()
    finally:
        ring.close()
    assert outcome.stop_code is StopCode.CANCELLED
    assert readable is asked
    assert drained == (b"", 0, False)  # woken, no token, not finished (the worker finishes)


@pytest.mark.anyio
async def test_a_signal_with_a_wake_descriptor_wakes_the_waiter_through_it() -> None:
    """``submit_signalling(fn, wake_fd)``: the signal is recorded and the descriptor,
    made readable after it (as the ring's loop does on starting), wakes the waiter; an
    end wakes it too."""
    worker = EngineWorker("test-signal-fd")
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    release = threading.Event()

    def work(signal: Callable[[], None]) -> str:
        signal()
        os.eventfd_write(wake_fd, 1)
        release.wait(30)
        return "done"

    try:
        call = worker.submit_signalling(work, wake_fd)
        with anyio.fail_after(10):
            assert await call.signalled() is True
        assert not call.done
        release.set()
        assert await call.wait() == "done"
        os.eventfd_read(wake_fd)
        failing = worker.submit_signalling(lambda signal: 1 // 0, wake_fd)
        with pytest.raises(ZeroDivisionError):  # its end wakes the waiter
            await failing.signalled()
        silent = worker.submit_signalling(lambda signal: "no signal", wake_fd)
        assert await silent.signalled() is False
    finally:
        release.set()
        os.close(wake_fd)
        await worker.shutdown()


@pytest.mark.anyio
@pytest.mark.parametrize("signal_after_s", [0.0, 0.05], ids=["at-once", "late"])
async def test_a_signal_whose_descriptor_stays_quiet_still_wakes_the_waiter(
    signal_after_s: float,
) -> None:
    """A call that signals and then works on without making its descriptor readable (a
    prompt-cache restore before the token loop) is seen as signalled while it runs."""
    worker = EngineWorker("test-signal-quiet")
    wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    release = threading.Event()

    def work(signal: Callable[[], None]) -> str:
        release.wait(signal_after_s)  # preparing (never released: it just takes this long)
        signal()
        release.wait(30)
        return "done"

    try:
        call = worker.submit_signalling(work, wake_fd)
        with anyio.fail_after(10):
            assert await call.signalled() is True
        assert not call.done  # still running: the descriptor never turned readable
        release.set()
        assert await call.wait() == "done"
    finally:
        release.set()
        os.close(wake_fd)
        await worker.shutdown()
