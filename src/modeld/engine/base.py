"""The contract between a worker thread, a token loop and the event loop.

A generation is driven by a :class:`TokenLoop` on the instance's worker thread. It writes
UTF-8 text into a :class:`TokenRing` (single producer: the loop; single consumer: the event
loop). The consumer sleeps on ``ring.fileno()`` and drains everything available at once.

Rules every loop keeps (the C loop and the Python twin alike):

* text is pushed as bytes; a UTF-8 character split across tokens is held back until it is
  complete, so a drained batch never ends inside a valid multi-byte sequence (bytes that
  can never become valid UTF-8 are pushed as they are; the consumer decodes with
  ``errors="replace"``);
* a stop string ends the generation with :attr:`StopCode.STOP`, and no byte of it or
  after it is ever pushed, also when it spans several tokens;
* the cancel flag is checked before every token and between prompt batches;
* when the ring is full the producer blocks without spinning until the consumer drains
  or cancels;
* the loop never calls ``finish()``: the worker does, after recording the outcome, so the
  consumer sees the outcome as soon as it sees the end of the stream.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from modeld.types import GrammarConstraint, LoopKind, SamplingParams

if TYPE_CHECKING:
    from llama_cpp import Llama

    from modeld.engine.logprobs import RawLogprob

__all__ = [
    "RING_CAPACITY_BYTES",
    "EngineClosed",
    "LoopOutcome",
    "NotOwnerThread",
    "StopCode",
    "TokenLoop",
    "TokenRing",
]

RING_CAPACITY_BYTES = 64 * 1024


class EngineClosed(RuntimeError):
    """The engine was closed: nothing can run on it any more (the scheduler loads the
    model again rather than touch freed llama.cpp memory)."""


class NotOwnerThread(RuntimeError):
    """An engine was called from a thread other than the one that owns its context.

    llama.cpp contexts are not thread-safe: two threads in one context corrupt it (or
    free it under the other), so the call is refused before it reaches llama.cpp."""


class StopCode(enum.IntEnum):
    """How a loop ended; integers so that C can report them without touching Python."""

    STOP = 0  # end-of-generation token or a stop string
    LENGTH = 1  # max_tokens reached (or the context is full)
    CANCELLED = 2  # the ring's cancel flag was set
    ERROR = 3  # llama.cpp failed (decode error); see LoopOutcome.error


@dataclass(frozen=True, slots=True)
class LoopOutcome:
    stop_code: StopCode
    prompt_tokens: int
    completion_tokens: int
    prompt_eval_ms: float
    eval_ms: float
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose KV was kept from the previous generation
    # The tokens whose KV the context holds afterwards, in position order (the prompt,
    # then every sampled token that was decoded); None when unknown (a decode failed or
    # was aborted), so that the next generation starts from an empty cache.
    kv_tokens: Sequence[int] | None = None


class TokenRing(Protocol):
    """Bounded SPSC byte ring with a cancel flag and a wake-up file descriptor.

    Consumer side (event loop): ``fileno``, ``drain``, ``watch_finish``, ``wake_at_start``,
    ``cancel``, ``close``. Producer side (worker thread): ``loop_started`` and ``push``
    (used by the loop), ``finish`` (by the worker).
    """

    def fileno(self) -> int:
        """A descriptor that turns readable when the ring turns non-empty or finishes."""
        ...

    def drain(self) -> tuple[bytes, int, bool]:
        """Take everything available without blocking: ``(text, tokens, finished)``.

        ``finished`` is true once the producer has called ``finish()`` and nothing is left.
        Clears the wake-up descriptor, so the next wait sleeps until new data arrives.
        """
        ...

    def drain_logprobs(self) -> list[RawLogprob]:
        """Take the log probabilities queued so far (a request that asked for them), one
        entry per generated token, in order: every token whose text a ``drain()`` has
        returned has its entry here by then (the loop queues it before pushing the text).
        """
        ...

    def watch_finish(self) -> bool:
        """Before the next ``drain()`` (after a wake-up, or on an empty ring): clear the
        wake-up descriptor without taking anything, so that until that drain it turns
        readable only on ``finish()``.

        Returns True when the stream has already finished. Lets the consumer let chunks
        gather while still seeing the end at once.
        """
        ...

    def wake_at_start(self) -> None:
        """Before the run: the descriptor turns readable once when a loop starts on the
        ring (``loop_started``), as a push would. The C loop wakes it after releasing
        the GIL, so the consumer, woken, never waits for a worker that still needs it."""
        ...

    def loop_started(self) -> None:
        """Producer side, as a loop starts: wakes the consumer if it asked
        (``wake_at_start``). The C loop does this itself."""
        ...

    def push(self, data: bytes, tokens: int) -> bool:
        """Append ``data`` (made by ``tokens`` tokens); blocks while full.

        Returns False, having pushed nothing more, once the ring is cancelled.
        """
        ...

    def push_logprob(self, entry: RawLogprob) -> None:
        """Queue one token's log probabilities before its text is pushed (the Python
        loop's side; the C loop queues its entries in C)."""
        ...

    def finish(self) -> None:
        """Mark the end of the stream and wake the consumer. Idempotent."""
        ...

    def cancel(self) -> None:
        """Ask the producer to stop; wakes it if it waits for space. Any thread, idempotent."""
        ...

    @property
    def cancelled(self) -> bool: ...

    def close(self) -> None:
        """Release the descriptor. Only after the producer is done with the ring."""
        ...


class TokenLoop(Protocol):
    """Runs one generation on the worker thread that owns ``llama``."""

    kind: LoopKind

    def new_ring(self, capacity_bytes: int = RING_CAPACITY_BYTES) -> TokenRing: ...

    def run(
        self,
        llama: Llama,
        ring: TokenRing,
        prompt_tokens: Sequence[int],
        params: SamplingParams,
        grammar: str | GrammarConstraint | None = None,
        *,
        cached: int = 0,
    ) -> LoopOutcome:
        """Evaluate the prompt, then sample until a stop condition.

        ``params.max_tokens`` must be set (the engine settles ``None``). ``grammar`` (GBNF
        text with a ``root`` rule, or a :class:`GrammarConstraint`: lazy with triggers)
        constrains the sampled tokens; one llama.cpp refuses ends the run as
        ``StopCode.ERROR`` before anything is evaluated.

        ``cached`` says the KV cache holds ``prompt_tokens[:cached]`` from the previous
        generation (``0 <= cached < len(prompt_tokens)``): the loop keeps them where
        llama.cpp can do so exactly and evaluates only the rest; otherwise, and when it is
        0, it starts from an empty cache. Blocks until the generation ends. Raises nothing
        for llama.cpp failures: they come back as ``StopCode.ERROR`` with a message.
        """
        ...
