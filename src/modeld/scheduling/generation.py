"""One running generation as the event loop sees it: chunks drained from the ring, then
exactly one :class:`~modeld.types.GenerationResult`."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import anyio

from modeld.engine.base import LoopOutcome, StopCode, TokenRing
from modeld.errors import EngineError
from modeld.scheduling.coalescing import Coalescer
from modeld.scheduling.logprob_align import LogprobAligner
from modeld.tools.formats import ToolFormat
from modeld.tools.parser import ContentDelta, Delta, ToolCallParser, collect
from modeld.types import (
    Chunk,
    DoneReason,
    GenerationMetrics,
    GenerationResult,
    TokenLogprob,
    ToolCallDelta,
)

if TYPE_CHECKING:
    from modeld.engine.worker import ThreadCall

__all__ = ["Generation", "RequestTiming"]

_STOP_REASONS = {
    StopCode.STOP: DoneReason.STOP,
    StopCode.LENGTH: DoneReason.LENGTH,
    StopCode.CANCELLED: DoneReason.CANCELLED,
    StopCode.ERROR: DoneReason.ERROR,
}


class RequestTiming:
    """Monotonic marks of one request's phases, in seconds."""

    def __init__(self) -> None:
        self.admitted_s = time.monotonic()
        self.load_s = 0.0
        self.started_s = 0.0
        self.first_chunk_s = 0.0
        self.deadline_s = math.inf  # the latest a load or a memory wait may end


class Generation:
    """Async iterator of :class:`Chunk`; ``result`` is set once it is exhausted.

    Cancelling the task that iterates does not stop the token loop by itself: the owner
    (``ModelManager.stream``) calls :meth:`aclose`, which cancels the ring and waits for
    the loop to return, so the instance is never handed on while its context is in use.
    """

    def __init__(
        self,
        *,
        request_id: str,
        model_id: str,
        ring: TokenRing,
        call: ThreadCall[LoopOutcome],
        timing: RequestTiming,
        deadline_s: float | None,
        on_finished: Callable[[Generation], None],
        max_gap_s: float,
        logprobs: bool = False,
    ) -> None:
        """``logprobs``: the request asked for log probabilities (the chunks carry them;
        the result too when read whole: :meth:`read_whole`)."""
        self.request_id = request_id
        self.model_id = model_id
        self.result: GenerationResult | None = None
        self._ring = ring
        self._call = call
        self._timing = timing
        self._deadline_s = deadline_s
        self._on_finished = on_finished
        self._cancel_reason: DoneReason | None = None
        self._held_tokens = 0
        self._coalescer = Coalescer(max_gap_s)
        self._waiting: anyio.CancelScope | None = None
        self._parser: ToolCallParser | None = None
        self._calls: list[Delta] = []
        self._aligner = LogprobAligner(ring) if logprobs else None
        self._held_logprobs: tuple[TokenLogprob, ...] = ()
        self._kept_logprobs: list[TokenLogprob] | None = None  # for the result: read whole

    def parse_tool_calls(self, tool_format: str | None) -> None:
        """Read the output as ``tool_format`` writes calls (before it is iterated): the
        chunks then carry content as ``text`` and completed calls as ``tool_calls``,
        and the result every call. A call never reaches ``text``; what does not parse
        as a call comes back as text."""
        self._parser = ToolCallParser(ToolFormat(tool_format)) if tool_format else None

    def read_whole(self) -> None:
        """The reader takes the answer only at its end (no stream): tokens may gather
        longer between wake-ups (:data:`~modeld.scheduling.coalescing.WHOLE_ANSWER_GAP_S`),
        and the result keeps every log-probability entry (a stream's result keeps none:
        they went out with its chunks, and holding them would grow with the answer).
        Call it before iterating."""
        self._coalescer.read_whole()
        if self._aligner is not None:
            self._kept_logprobs = []

    def cancel(self, reason: DoneReason = DoneReason.CANCELLED) -> None:
        """Stop the token loop within one token; the result will say ``reason``."""
        if self._cancel_reason is None and self.result is None:
            self._cancel_reason = reason
        self._ring.cancel()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Chunk:
        chunk = await self._next_chunk()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    async def _next_chunk(self) -> Chunk | None:
        while self.result is None:
            data, tokens, finished = self._ring.drain()
            if data:
                now_s = time.monotonic()
                self._coalescer.chunk_sent(now_s, tokens)
                if not self._timing.first_chunk_s:
                    self._timing.first_chunk_s = now_s
                text = data.decode("utf-8", "replace")
                chunk = self._parsed(text, tokens, self._logprobs(len(data)), final=False)
                if chunk is not None:
                    return chunk
                continue
            self._held_tokens += tokens  # a token whose text is still held back
            if finished:
                last = self._parsed("", 0, self._logprobs(0, final=True), final=True)
                await self._finish()
                return last
            timeout_s = None
            if self._deadline_s is not None:
                timeout_s = self._deadline_s - time.monotonic()
                if timeout_s <= 0:
                    self.cancel(DoneReason.TIMEOUT)
                    timeout_s = None
            with anyio.move_on_after(
                timeout_s if timeout_s is not None else math.inf
            ) as self._waiting:
                await self._wait_for_tokens()
            self._waiting = None
        return None

    def _logprobs(self, released_bytes: int, *, final: bool = False) -> tuple[TokenLogprob, ...]:
        if self._aligner is None:
            return ()
        taken = self._aligner.take(released_bytes, final=final)
        if self._kept_logprobs is not None:
            self._kept_logprobs += taken
        return taken

    def _parsed(
        self, text: str, tokens: int, logprobs: tuple[TokenLogprob, ...], *, final: bool
    ) -> Chunk | None:
        """The chunk ``text`` makes (None while the parser holds it all back: its
        tokens and log probabilities go with the next chunk)."""
        tokens += self._held_tokens
        logprobs = self._held_logprobs + logprobs
        self._held_tokens, self._held_logprobs = 0, ()
        if self._parser is None:
            return Chunk(text, tokens, logprobs=logprobs) if text or logprobs else None
        deltas = self._parser.finish() if final else self._parser.feed(text)
        content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        calls = tuple(d for d in deltas if isinstance(d, ToolCallDelta))
        self._calls += calls
        if not content and not calls and not (final and logprobs):
            self._held_tokens, self._held_logprobs = tokens, logprobs
            return None
        return Chunk(content, tokens, calls, logprobs)

    async def _wait_for_tokens(self) -> None:
        """Sleep until there is something to drain, letting a fast model's tokens gather
        first (:class:`~modeld.scheduling.coalescing.Coalescer`): one wake-up per window.

        A hold never delays the end of the stream: after ``watch_finish()`` only the
        ring's ``finish()`` wakes the descriptor, so a loop that finishes (or stops after
        a cancel) ends the hold at once. A cancelled stream is not held.
        """
        hold_s = 0.0 if self._ring.cancelled else self._coalescer.hold_s(time.monotonic())
        if hold_s > 0:
            if not self._ring.watch_finish():
                with anyio.move_on_after(hold_s):
                    await anyio.wait_readable(self._ring.fileno())
            return  # to the drain, which also re-arms the wake-up on the next token
        await anyio.wait_readable(self._ring.fileno())

    async def aclose(self) -> None:
        """Cancel if still running and wait, shielded, until the loop has returned."""
        if self.result is not None:
            return
        self.cancel(self._cancel_reason or DoneReason.CANCELLED)
        with anyio.CancelScope(shield=True):
            while self.result is None:
                await self._next_chunk()

    def abandon(self, reason: DoneReason) -> None:
        """End this generation now although its loop has not returned (a hung worker at
        shutdown): the result says ``reason`` with an error, and whoever waits is woken.

        The ring is left open: the loop may still write into it.
        """
        if self.result is not None:
            return
        outcome = LoopOutcome(StopCode.ERROR, 0, 0, 0.0, 0.0, error="the worker did not stop")
        self._settle(reason, outcome)
        if self._waiting is not None:
            self._waiting.cancel()

    async def _finish(self) -> None:
        # The ring is finished, so the loop has returned and its outcome is moments away:
        # wait for it shielded, or a cancellation here would leave a closed ring and no
        # result.
        with anyio.CancelScope(shield=True):
            try:
                outcome = await self._call.wait()
            finally:
                self._ring.close()
        reason = _STOP_REASONS[outcome.stop_code]
        if outcome.stop_code is StopCode.CANCELLED:
            reason = self._cancel_reason or DoneReason.CANCELLED
        self._settle(reason, outcome)

    def _settle(self, reason: DoneReason, outcome: LoopOutcome) -> None:
        self.result = GenerationResult(
            done_reason=reason,
            model=self.model_id,
            request_id=self.request_id,
            metrics=self._metrics(outcome),
            error={"code": EngineError.code, "message": outcome.error} if outcome.error else None,
            tool_calls=collect(self._calls)[1],
            logprobs=self._result_logprobs(),
        )
        self._on_finished(self)

    def _result_logprobs(self) -> tuple[TokenLogprob, ...] | None:
        if self._aligner is None:
            return None
        kept, self._kept_logprobs = self._kept_logprobs, None
        return tuple(kept) if kept is not None else ()

    def _metrics(self, outcome: LoopOutcome) -> GenerationMetrics:
        timing = self._timing
        now_s = time.monotonic()
        eval_s = outcome.eval_ms / 1000
        return GenerationMetrics(
            prompt_tokens=outcome.prompt_tokens,
            completion_tokens=outcome.completion_tokens,
            cached_tokens=outcome.cached_tokens,
            queue_ms=_ms(timing.started_s - timing.admitted_s - timing.load_s),
            load_ms=_ms(timing.load_s),
            ttft_ms=_ms(timing.first_chunk_s - timing.admitted_s) if timing.first_chunk_s else 0.0,
            prompt_eval_ms=round(outcome.prompt_eval_ms, 3),
            eval_ms=round(outcome.eval_ms, 3),
            total_ms=_ms(now_s - timing.admitted_s),
            tokens_per_second=round(outcome.completion_tokens / eval_s, 3) if eval_s > 0 else 0.0,
        )


def _ms(seconds: float) -> float:
    return round(max(0.0, seconds) * 1000, 3)
