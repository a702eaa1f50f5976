"""OpenAI's answers: the JSON objects of chat and text completions, and their SSE framing.

A stream is ``data: {json}\\n\\n`` events: (chat) a first chunk with the role, content
deltas, a chunk with an empty delta and the ``finish_reason``, with
``stream_options.include_usage`` a chunk with ``choices: []`` and the usage, then
``data: [DONE]``. With ``n`` > 1 the choices follow one another, each from its role
chunk to its finish chunk under its own ``index``; the usage (all choices) and
``[DONE]`` come once, after the last. A generation that ends early (evicted, timeout,
cancelled, error, shutdown) ends with an ``error`` event and no ``[DONE]``, so the client
raises; with ``n`` > 1 so does an unload between two choices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import modeld
from modeld.api.context import RequestContext
from modeld.api.errors import early_end_error
from modeld.api.logprobs import LegacyLogprobs, token_entries
from modeld.api.openai.errors import OPENAI_ERRORS
from modeld.api.streaming import one_line_json
from modeld.api.tools import finish_reason, openai_call_delta, openai_calls
from modeld.types import Chunk, GenerationResult, TokenLogprob

__all__ = [
    "SSE",
    "ChatFraming",
    "Completion",
    "CompletionFraming",
    "event",
    "usage",
]

SSE = "text/event-stream"
FINGERPRINT = f"fp_modeld_{modeld.__version__}"
_DONE = b"data: [DONE]\n\n"


def event(data: object) -> bytes:
    return b"data: " + one_line_json(data) + b"\n\n"


def usage(result: GenerationResult, *more: GenerationResult) -> dict[str, object]:
    """The usage of an answer of one or more choices (``more``: the choices after the
    first): the prompt counted once, as the first choice met it, and every choice's
    tokens."""
    metrics = result.metrics
    completion_tokens = metrics.completion_tokens + sum(
        other.metrics.completion_tokens for other in more
    )
    return {
        "prompt_tokens": metrics.prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": metrics.prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": metrics.cached_tokens},
    }


@dataclass(frozen=True, slots=True)
class Completion:
    """What every object of one answer shares."""

    id: str
    created: int
    model: str
    chat: bool

    def header(self, chunked: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {
            "id": self.id,
            "object": kind + ".chunk" if chunked and self.chat else kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": FINGERPRINT,
        }

    def logprobs(self, logprobs: Sequence[TokenLogprob] | None, legacy: LegacyLogprobs) -> Any:
        """A choice's ``logprobs`` (None when not asked): chat's ``content`` entries,
        or completions' legacy lists continued by ``legacy``."""
        if logprobs is None:
            return None
        if self.chat:
            return {"content": token_entries(logprobs), "refusal": None}
        return legacy.shape(logprobs)

    def whole(self, text: str, result: GenerationResult) -> dict[str, Any]:
        """The non-streamed answer."""
        return self.whole_choices([(text, result)])

    def whole_choices(self, answers: Sequence[tuple[str, GenerationResult]]) -> dict[str, Any]:
        """The non-streamed answer with one choice per answer (``n``), each with its own
        index and finish reason; the usage counts the prompt once and every choice's
        tokens."""
        choices = []
        for index, (text, result) in enumerate(answers):
            choice: dict[str, Any] = {"index": index}
            choice["logprobs"] = self.logprobs(result.logprobs, LegacyLogprobs())
            choice["finish_reason"] = finish_reason(result)
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text, "refusal": None}
                if result.tool_calls:  # content null when the answer is only calls
                    choice["message"]["content"] = text or None
                    choice["message"]["tool_calls"] = openai_calls(result.tool_calls)
            else:
                choice["text"] = text
            choices.append(choice)
        counts = usage(*(result for _, result in answers))
        return {**self.header(chunked=False), "choices": choices, "usage": counts}


class _Framing:
    """Events of choice ``index`` (the next after :meth:`next_choice`: ``n``)."""

    media_type = SSE

    def __init__(
        self, completion: Completion, include_usage: bool, context: RequestContext
    ) -> None:
        self._completion = completion
        self._include_usage = include_usage
        self._context = context
        self._index = 0
        self._ended: list[GenerationResult] = []  # the choices before the current one
        self._legacy = LegacyLogprobs()

    def _logprobs(self, chunk: Chunk) -> Any:
        """The chunk's entries in this answer's shape; None for a chunk without any."""
        return self._completion.logprobs(chunk.logprobs or None, self._legacy)

    def _choice(self, choice: dict[str, Any]) -> bytes:
        choices = [{"index": self._index, **choice}]
        data = {**self._completion.header(chunked=True), "choices": choices}
        if self._include_usage:
            data["usage"] = None
        return event(data)

    def _delta(self, text: str, finish: str | None, logprobs: Any = None) -> bytes:
        raise NotImplementedError

    def chunk(self, chunk: Chunk) -> bytes:
        return self._delta(chunk.text, None, self._logprobs(chunk))

    def next_choice(self, result: GenerationResult) -> bytes:
        """The current choice's finish chunk; the usage waits for the stream's end."""
        last = self._delta("", finish_reason(result))
        self._ended.append(result)
        self._index += 1
        self._legacy = LegacyLogprobs()  # completions count text_offset per choice
        return last

    def end(self, result: GenerationResult) -> bytes:
        error = early_end_error(result)
        if error is not None:
            failure = OPENAI_ERRORS.failure(error, self._context)
            return OPENAI_ERRORS.stream_end(failure, result.model)
        last = self._delta("", finish_reason(result))
        if self._include_usage:
            counts = usage(*self._ended, result)
            data = {**self._completion.header(chunked=True), "choices": [], "usage": counts}
            last += event(data)
        return last + _DONE


class ChatFraming(_Framing):
    """``chat.completion.chunk`` events."""

    def head(self) -> bytes:
        choice = {"delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return self._choice({**choice, "finish_reason": None})

    def _delta(self, text: str, finish: str | None, logprobs: Any = None) -> bytes:
        delta = {"content": text} if finish is None else {}
        return self._choice({"delta": delta, "logprobs": logprobs, "finish_reason": finish})

    def chunk(self, chunk: Chunk) -> bytes:
        """Content (with its tokens' ``logprobs`` when asked), then each piece of a call
        (``delta.tool_calls``) as its own event."""
        out = b""
        if chunk.text or chunk.logprobs or not chunk.tool_calls:
            out = self._delta(chunk.text, None, self._logprobs(chunk))
        for piece in chunk.tool_calls:
            delta = {"tool_calls": [openai_call_delta(piece)]}
            out += self._choice({"delta": delta, "logprobs": None, "finish_reason": None})
        return out


class CompletionFraming(_Framing):
    """``text_completion`` events."""

    def head(self) -> bytes:
        return b""

    def _delta(self, text: str, finish: str | None, logprobs: Any = None) -> bytes:
        return self._choice({"text": text, "logprobs": logprobs, "finish_reason": finish})
