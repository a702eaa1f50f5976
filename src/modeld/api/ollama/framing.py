"""Ollama's answers: NDJSON lines of ``response`` (generate) or ``message`` (chat)
pieces, then one line with the statistics; or the same as one object (``stream: false``).

A stream that modeld ends early (evicted, timeout, shutdown, error) ends with an
``{"error": ...}`` line instead, which the ollama client raises as ``ResponseError``.
"""

from __future__ import annotations

import time

from modeld.api.context import RequestContext
from modeld.api.errors import early_end_error
from modeld.api.logprobs import token_entries
from modeld.api.ollama.errors import OLLAMA_ERRORS
from modeld.api.ollama.facts import iso_time
from modeld.api.ollama.wire import final_fields
from modeld.api.streaming import NDJSON, ndjson_line
from modeld.api.tools import ollama_calls
from modeld.types import Chunk, GenerationResult

__all__ = ["OllamaFraming"]


class OllamaFraming:
    """A :class:`~modeld.api.streaming.StreamFraming` for ``/api/generate`` and
    ``/api/chat``; ``name`` is the model as the client named it."""

    media_type = NDJSON

    def __init__(self, name: str, context: RequestContext, *, chat: bool) -> None:
        self._name = name
        self._context = context
        self._chat = chat

    def _piece(self, text: str) -> dict[str, object]:
        line: dict[str, object] = {"model": self._name, "created_at": iso_time(time.time())}
        if self._chat:
            line["message"] = {"role": "assistant", "content": text}
        else:
            line["response"] = text
        return line

    def head(self) -> bytes:
        return b""

    def chunk(self, chunk: Chunk) -> bytes:
        line = self._piece(chunk.text)
        if chunk.tool_calls:  # whole calls: a call's pieces come out together
            line["message"]["tool_calls"] = ollama_calls(chunk.tool_calls)  # type: ignore[index]
        if chunk.logprobs:
            line["logprobs"] = token_entries(chunk.logprobs)
        return ndjson_line({**line, "done": False})

    def end(self, result: GenerationResult) -> bytes:
        error = early_end_error(result)
        if error is not None:
            return OLLAMA_ERRORS.stream_end(OLLAMA_ERRORS.failure(error, self._context), self._name)
        return ndjson_line({**self._piece(""), **final_fields(result)})

    def whole(self, text: str, result: GenerationResult) -> dict[str, object]:
        """The one object of an unstreamed answer (its early end is answered as an
        error instead)."""
        line = self._piece(text)
        if result.tool_calls:
            line["message"]["tool_calls"] = ollama_calls(result.tool_calls)  # type: ignore[index]
        if result.logprobs is not None:
            line["logprobs"] = token_entries(result.logprobs)
        return {**line, **final_fields(result)}
