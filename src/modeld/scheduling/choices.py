"""Several answers to one request (OpenAI's ``n``) on one admission.

The choices of a request run one after another on the model's slot, which the request
holds from its turn until its last choice ends: no other request runs between them, so
each choice after the first finds the prompt's KV left by the one before and evaluates
only the prompt's last token (prompt reuse; the request is prepared once, see
:func:`~modeld.engine.contract.run_choice`). A request with one choice is the same run
with ``count=1``.

A run is what the instance and the launcher know as running (``Instance.active``, the
launcher's table by request id): cancelling it (the client left, an unload, shutdown,
``cancel_request``) cancels the choice running then, or, between two choices, keeps the
next from starting; iteration then ends and :attr:`ChoiceRun.stopped` says why.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from modeld.engine.contract import Request
from modeld.errors import InvalidRequest
from modeld.scheduling.generation import Generation
from modeld.types import (
    MAX_CHOICES,
    MAX_LOGPROB_VALUES,
    DoneReason,
    GenerationMetrics,
    GenerationResult,
)

__all__ = [
    "FINISHED_REASONS",
    "ChoiceRun",
    "NextChoice",
    "check_choices",
    "check_logprob_volume",
]

FINISHED_REASONS = frozenset({DoneReason.STOP, DoneReason.LENGTH})
"""The ends after which the next choice starts; any other ends the run."""

# Starts choice ``index`` (>= 1) on the held slot; None: the instance is going away.
NextChoice = Callable[[int], Awaitable[Generation | None]]


def check_choices(count: int) -> None:
    """Raises :class:`InvalidRequest` (field ``n``) unless 1 to :data:`MAX_CHOICES`: the
    bound is checked before anything is admitted."""
    if type(count) is not int or not 1 <= count <= MAX_CHOICES:
        raise InvalidRequest(f"n is 1 to {MAX_CHOICES} choices, not {count!r}", field="n")


def check_logprob_volume(request: Request, count: int, n_ctx: int) -> None:
    """Raises :class:`InvalidRequest` (field ``logprobs``) when the log probabilities
    ``count`` answers to ``request`` may report pass :data:`MAX_LOGPROB_VALUES`: tokens
    (``max_tokens``, at most the context ``n_ctx``; the context when unset) x choices x
    (1 + alternatives). A whole answer holds them all until it is written, so the bound
    is checked before anything is admitted."""
    if request.logprobs is None:
        return
    tokens = min(request.max_tokens or n_ctx, n_ctx)
    values = tokens * count * (1 + request.logprobs)
    if values > MAX_LOGPROB_VALUES:
        raise InvalidRequest(
            f"logprobs: up to {values:,} log probabilities ({tokens} tokens x {count}"
            f" choices x (1 + {request.logprobs} alternatives)), over the {MAX_LOGPROB_VALUES:,}"
            " one request may report: ask for fewer alternatives, choices or tokens",
            field="logprobs",
        )


class ChoiceRun:
    """Async iterator of the request's choices, each a :class:`Generation`; the next one
    starts when it is asked for, once the one before has ended (read it to its end).

    Iteration ends after ``count`` choices, after a choice that ended early (its result
    says why), or when the run was cancelled or ran out of time between two choices
    (then :attr:`stopped` is the terminal result of the choice that never started). The
    owner (``ModelManager.choices``) calls :meth:`aclose` on the way out.
    """

    def __init__(
        self,
        *,
        request_id: str,
        model_id: str,
        count: int,
        on_end: Callable[[ChoiceRun], None],
    ) -> None:
        self.request_id = request_id
        self.model_id = model_id
        self.count = count
        self.stopped: GenerationResult | None = None
        self.deadline_s: float | None = None  # the request's --infer-timeout, all choices
        self._on_end = on_end
        self._ended = False
        self._stop_reason: DoneReason | None = None
        self._current: Generation | None = None
        self._started = 0  # choices started
        self._handed = 0  # choices handed out by iteration
        self._next: NextChoice | None = None

    def begin(self, first: Generation, next_choice: NextChoice) -> None:
        """The first choice is running; ``next_choice`` starts the others."""
        self._current = first
        self._started = 1
        self._next = next_choice

    @property
    def first(self) -> Generation:
        """The first choice (a request of one choice: its generation)."""
        assert self._current is not None
        assert self._started == 1
        return self._current

    @property
    def index(self) -> int:
        """The index of the choice running now, or of the last one."""
        return self._started - 1

    def __aiter__(self) -> ChoiceRun:
        return self

    async def __anext__(self) -> Generation:
        current = self._current
        assert current is not None, "begin() first"
        if self._handed < self._started:
            self._handed = self._started
            return current
        await current.aclose()  # a choice left unread is cancelled: the run ends
        assert current.result is not None
        if self._started >= self.count or current.result.done_reason not in FINISHED_REASONS:
            raise StopAsyncIteration
        if self.deadline_s is not None and time.monotonic() >= self.deadline_s:
            self.cancel(DoneReason.TIMEOUT)
        if self._stop_reason is None:
            assert self._next is not None
            generation = await self._next(self._started)
            if generation is not None:
                self._current = generation
                self._started += 1
                self._handed = self._started
                return generation
        self._stop(self._stop_reason or DoneReason.EVICTED)  # None: it is being unloaded
        raise StopAsyncIteration

    def cancel(self, reason: DoneReason = DoneReason.CANCELLED) -> None:
        """Cancel the running choice (within one token) and start no other."""
        if self._stop_reason is None:
            self._stop_reason = reason
        if self._current is not None and self._current.result is None:
            self._current.cancel(reason)

    def abandon(self, reason: DoneReason) -> None:
        """The worker hung: end the running choice now (see :meth:`Generation.abandon`)."""
        self.cancel(reason)
        if self._current is not None:
            self._current.abandon(reason)

    def choice_ended(self, generation: Generation) -> None:
        """A choice's result is in (on the event loop): the run ends with the last
        choice, an early end, or a cancel, so the slot goes on at once."""
        result = generation.result
        assert result is not None
        if (
            self._started >= self.count
            or result.done_reason not in FINISHED_REASONS
            or self._stop_reason is not None
        ):
            self._end()

    async def aclose(self) -> None:
        """Cancel the running choice if any, wait (shielded) until its loop has returned,
        and end the run: the slot goes on."""
        try:
            if self._current is not None:
                await self._current.aclose()
        finally:
            self._end()

    def _stop(self, reason: DoneReason) -> None:
        self.stopped = GenerationResult(
            done_reason=reason,
            model=self.model_id,
            request_id=self.request_id,
            metrics=GenerationMetrics(),
        )
        self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(self)
