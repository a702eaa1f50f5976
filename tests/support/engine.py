"""Helpers for the token loop tests: a reference generation, a worker + consumer pair."""

from __future__ import annotations

import ctypes
import os
import select
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import llama_cpp
from llama_cpp import Llama
from llama_cpp.llama_grammar import LlamaGrammar

from modeld.engine.base import LoopOutcome, TokenLoop, TokenRing
from modeld.engine.pyring import PyTokenRing
from modeld.types import GrammarConstraint, LoopKind, SamplingParams
from tests.support.poll import poll


def piece(llama: Llama, token: int) -> bytes:
    """The bytes a loop emits for one token (llama_token_to_piece, specials not rendered)."""
    buffer = (ctypes.c_char * 1024)()
    n = llama_cpp.llama_token_to_piece(llama._model.vocab, token, buffer, 1024, 0, False)
    assert n >= 0
    return buffer.raw[:n]


def is_eog(llama: Llama, token: int) -> bool:
    return bool(llama_cpp.llama_vocab_is_eog(llama._model.vocab, token))


def reference_tokens(
    llama: Llama, prompt: Sequence[int], params: SamplingParams, grammar: str | None = None
) -> list[int]:
    """Token ids from ``Llama.generate()`` itself, up to and including an EOG token."""
    assert params.seed is not None or params.temperature == 0.0
    assert params.max_tokens is not None
    llama.set_seed(params.seed or 0)
    llama.reset()  # no prefix reuse: the KV cache is rebuilt exactly as the loops do it
    tokens: list[int] = []
    generator = llama.generate(
        prompt,
        top_k=params.top_k,
        top_p=params.top_p,
        min_p=params.min_p,
        temp=params.temperature,
        repeat_penalty=params.repeat_penalty,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        grammar=LlamaGrammar.from_string(grammar) if grammar is not None else None,
        reset=True,
    )
    for token in generator:
        tokens.append(token)
        if is_eog(llama, token) or len(tokens) >= params.max_tokens:
            break
    generator.close()
    llama.reset()
    return tokens


@dataclass
class Streamed:
    """What a consumer saw: every drained batch, the token total, the loop's outcome."""

    batches: list[bytes] = field(default_factory=list)
    tokens: int = 0
    outcome: LoopOutcome | None = None

    @property
    def text(self) -> bytes:
        return b"".join(self.batches)


def run_in_worker(
    run: Callable[[], LoopOutcome], ring: TokenRing
) -> tuple[threading.Thread, list[LoopOutcome | BaseException]]:
    """Start ``run`` on a worker thread that finishes the ring afterwards, as the worker does."""
    result: list[LoopOutcome | BaseException] = []

    def work() -> None:
        try:
            result.append(run())
        except BaseException as exc:
            result.append(exc)
        finally:
            ring.finish()

    thread = threading.Thread(target=work, name="test-token-loop")
    thread.start()
    return thread, result


def outcome_of(thread: threading.Thread, result: list[LoopOutcome | BaseException]) -> LoopOutcome:
    thread.join()
    (value,) = result
    if isinstance(value, BaseException):
        raise value
    return value


def consume(ring: TokenRing, on_batch: Callable[[bytes], None] | None = None) -> Streamed:
    """Sleep on the ring's fd and drain until it is finished, like the event loop does."""
    seen = Streamed()
    while True:
        select.select([ring.fileno()], [], [])
        data, tokens, finished = ring.drain()
        if data:
            seen.batches.append(data)
            if on_batch is not None:
                on_batch(data)
        seen.tokens += tokens
        if finished:
            return seen


def stream(
    loop: TokenLoop,
    llama: Llama,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    capacity_bytes: int = 64 * 1024,
    grammar: str | GrammarConstraint | None = None,
    cached: int = 0,
) -> Streamed:
    """One generation, worker thread producing and this thread consuming."""
    ring = loop.new_ring(capacity_bytes)
    try:
        thread, result = run_in_worker(
            lambda: loop.run(llama, ring, prompt, params, grammar, cached=cached), ring
        )
        seen = consume(ring)
        seen.outcome = outcome_of(thread, result)
        return seen
    finally:
        ring.close()


class PausingPyRing(PyTokenRing):
    """A Python ring whose first ``cancelled`` read waits for cancel().

    The Python loop reads ``cancelled`` first between prompt chunks (it stops at chunk
    boundaries; the C loop also inside one), so this holds prompt evaluation exactly where
    a test wants to cancel.
    """

    def __init__(self, capacity_bytes: int, paused: threading.Event) -> None:
        super().__init__(capacity_bytes)
        self._paused = paused
        self._first_read = True

    @property
    def cancelled(self) -> bool:
        if self._first_read:
            self._first_read = False
            self._paused.set()
            with self._cond:
                self._cond.wait_for(lambda: self._cancelled)
        return self._cancelled


def run_paused_in_prompt(
    loop: TokenLoop,
    llama: Llama,
    prompt: Sequence[int],
    params: SamplingParams,
    *,
    cached: int = 0,
) -> tuple[LoopOutcome, Streamed]:
    """Run a generation, cancel it from this thread while its prompt decode is held."""
    paused = threading.Event()
    if loop.kind is LoopKind.C:
        pause_fd = os.eventfd(0, os.EFD_CLOEXEC)
        ring = loop.new_ring()
        run_traced = loop.run_traced  # type: ignore[attr-defined]

        def run() -> LoopOutcome:
            outcome: LoopOutcome = run_traced(
                llama, ring, prompt, params, cached=cached, pause_in_prompt_fd=pause_fd
            )[0]
            return outcome

        thread, result = run_in_worker(run, ring)
        os.eventfd_read(pause_fd)  # blocks until the loop is inside the first prompt decode
        os.close(pause_fd)
    else:
        ring = PausingPyRing(64 * 1024, paused)
        thread, result = run_in_worker(
            lambda: loop.run(llama, ring, prompt, params, cached=cached), ring
        )
        paused.wait()
    ring.cancel()
    seen = consume(ring)
    outcome = outcome_of(thread, result)
    ring.close()
    return outcome, seen


def wait_until(predicate: Callable[[], bool]) -> None:
    """Yield the CPU until ``predicate`` holds (bounded by the test timeout).

    Only for states that have no event to wait on, such as a producer asleep on a full ring.
    """
    poll(predicate, timeout_s=60, every_s=0.0)  # sleep(0) yields the CPU
