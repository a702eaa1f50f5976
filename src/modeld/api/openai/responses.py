"""``POST /v1/responses`` for text: ``input`` (a string or messages), ``instructions``,
streamed as the Responses API's typed events. Stateless: no tools, no stored responses
(``previous_response_id`` and ``background`` are refused by name).

The same ``ModelManager.stream`` as every chat: the input becomes a :class:`ChatRequest`.
"""

from __future__ import annotations

import time
from typing import Any

from modeld.api.bodies import convert_fields, decode_json
from modeld.api.context import RequestContext
from modeld.api.edge import Edge
from modeld.api.errors import UnsupportedParam, early_end_error
from modeld.api.logprobs import token_entries
from modeld.api.openai.errors import OPENAI_ERRORS, error_object
from modeld.api.openai.framing import SSE, usage
from modeld.api.openai.translate import (
    messages_from,
    msgspec_message,
    response_format,
    sampling_of,
    with_defaults,
)
from modeld.api.openai.wire import ResponseBody
from modeld.api.sampling import SAMPLING_FIELDS, SamplingNames, logprob_fields
from modeld.api.streaming import StreamFraming, one_line_json
from modeld.errors import InvalidRequest
from modeld.scheduling.generation import Generation
from modeld.types import ChatRequest, Chunk, DoneReason, GenerationResult, TokenLogprob

__all__ = ["RESPONSES", "RESPONSES_SAMPLING", "ResponsesProtocol"]

RESPONSES_SAMPLING = SamplingNames(
    "responses",
    renamed={"max_tokens": "max_output_tokens"},
    unsupported=frozenset(SAMPLING_FIELDS) - {"max_tokens", "temperature", "top_p"},
)
"""The Responses API's sampling parameters: ``max_output_tokens``, ``temperature`` and
``top_p`` (it has no others; whatever else a body holds is ignored, as OpenAI does)."""

_PART_TYPES = frozenset({"input_text", "output_text", "text"})
OUTPUT_LOGPROBS = "message.output_text.logprobs"
"""What ``include`` names to have the output text's ``logprobs`` filled."""


def _unsupported(param: str, why: str) -> InvalidRequest:
    return UnsupportedParam(f"{param}: {why}", field=param)


def _messages(body: ResponseBody) -> list[dict[str, Any]]:
    """``input`` as chat messages (``instructions`` first, as a system message)."""
    items: list[dict[str, Any]] = []
    if body.instructions:
        items.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*items, {"role": "user", "content": body.input}]
    if not isinstance(body.input, list) or not body.input:
        raise _unsupported("input", "input is a string or a non-empty list of messages")
    for index, item in enumerate(body.input):
        where = f"input[{index}]"
        if not isinstance(item, dict) or item.get("type", "message") != "message":
            kind = item.get("type") if isinstance(item, dict) else None
            raise _unsupported(where, f"{kind or 'this'} items are not supported (text only)")
        content = item.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") not in _PART_TYPES:
                    kind = part.get("type") if isinstance(part, dict) else None
                    raise _unsupported(
                        f"{where}.content", f"{kind or 'this'} parts are not supported"
                    )
                texts.append(str(part.get("text", "")))
            content = "\n".join(texts)
        items.append({"role": item.get("role"), "content": content})
    return items


def _chat_request(body: ResponseBody, sampling: dict[str, object], edge: Edge) -> ChatRequest:
    if body.tools:
        raise _unsupported("tools", "/v1/responses takes no tools: use /v1/chat/completions")
    if body.previous_response_id:
        raise _unsupported("previous_response_id", "modeld stores no responses; send the input")
    if body.background:
        raise _unsupported("background", "background responses are not supported")
    text_format = (body.text or {}).get("format")
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        text_format = {"type": "json_schema", "json_schema": text_format}
    fields: dict[str, object] = {
        **sampling,
        "messages": [msgspec_message(m) for m in messages_from(_messages(body))],
        "model": body.model,
        "stream": bool(body.stream),
        "format": response_format(text_format),
    }
    asked = OUTPUT_LOGPROBS in (body.include or ()) or body.top_logprobs is not None
    fields.update(logprob_fields(asked, body.top_logprobs))
    return convert_fields(with_defaults(fields, body.model, edge.defaults_for), ChatRequest)


class _Response:
    """One response object as it grows: the Responses API repeats it in its events."""

    def __init__(
        self, response_id: str, model: str, body: ResponseBody, sampling: dict[str, object]
    ) -> None:
        self.id = response_id
        self.item_id = "msg_" + response_id.removeprefix("resp_")
        self.created_at = int(time.time())
        self.model = model
        self.body = body
        self.sampling = sampling
        self.text = ""
        self.logprobs: list[TokenLogprob] = []  # the text's, when asked
        self._shaped: Any = None  # the logprobs as JSON, once the text is complete
        self.sequence = 0

    def item(self, status: str) -> dict[str, Any]:
        content = [] if status == "in_progress" else [self.part()]
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def part(self) -> dict[str, Any]:
        shaped = self._shaped if self._shaped is not None else token_entries(self.logprobs)
        return {"type": "output_text", "text": self.text, "annotations": [], "logprobs": shaped}

    def finish_text(self) -> Any:
        """The text is complete: its ``logprobs`` are encoded once, the entries let go,
        and the same bytes go into every event that repeats them (a stream ends with
        four: the text, its part, its item and the response)."""
        self._shaped = token_entries(self.logprobs)
        self.logprobs = []
        return self._shaped

    def item_status(self, result: GenerationResult) -> str:
        """A message cut at ``max_output_tokens`` is ``incomplete``, as its response is."""
        return "completed" if result.done_reason is DoneReason.STOP else "incomplete"

    def whole(self, result: GenerationResult | None) -> dict[str, Any]:
        finished = result is not None
        complete = result is not None and result.done_reason is DoneReason.STOP
        status = "in_progress" if not finished else "completed" if complete else "incomplete"
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "incomplete_details": {"reason": "max_output_tokens"}
            if finished and not complete
            else None,
            "error": None,
            "instructions": self.body.instructions,
            "max_output_tokens": self.sampling.get("max_tokens"),
            "model": self.model,
            "output": [self.item(self.item_status(result))] if result is not None else [],
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "temperature": self.sampling.get("temperature"),
            "top_p": self.sampling.get("top_p"),
            "top_logprobs": self.body.top_logprobs,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": self.text_format()},
            "truncation": "disabled",
            "usage": _usage(result) if result is not None else None,
            "metadata": {},
        }

    def text_format(self) -> dict[str, Any]:
        """``text.format`` as it was asked for (a schema echoed with its name)."""
        asked = (self.body.text or {}).get("format")
        return asked if isinstance(asked, dict) and asked.get("type") else {"type": "text"}

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: ".encode() + one_line_json(data) + b"\n\n"


def _usage(result: GenerationResult) -> dict[str, object]:
    counts = usage(result)
    cached = result.metrics.cached_tokens
    return {
        "input_tokens": counts["prompt_tokens"],
        # what this prompt left in the model's KV cache for the next one to reuse
        "input_tokens_details": {
            "cached_tokens": cached,
            "cache_write_tokens": result.metrics.prompt_tokens - cached,
        },
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"],
    }


class _ResponseFraming:
    """The Responses API's events: created, in_progress, the output item and its text
    part added, text deltas, then each closed, then completed (or incomplete at
    ``max_output_tokens``); a generation that ends early ends with an ``error`` event."""

    media_type = SSE

    def __init__(self, response: _Response, context: RequestContext) -> None:
        self._r = response
        self._context = context

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._r.item_id, "output_index": 0, "content_index": 0}

    def head(self) -> bytes:
        r = self._r
        return (
            r.event("response.created", response=r.whole(None))
            + r.event("response.in_progress", response=r.whole(None))
            + r.event("response.output_item.added", output_index=0, item=r.item("in_progress"))
            + r.event("response.content_part.added", **self._where(), part=r.part())
        )

    def chunk(self, chunk: Chunk) -> bytes:
        self._r.text += chunk.text
        self._r.logprobs += chunk.logprobs
        logprobs = token_entries(chunk.logprobs)
        return self._r.event(
            "response.output_text.delta", **self._where(), delta=chunk.text, logprobs=logprobs
        )

    def end(self, result: GenerationResult) -> bytes:
        r = self._r
        early = early_end_error(result)
        if early is not None:
            failure = OPENAI_ERRORS.failure(early, self._context)
            error = {"error": error_object(failure, early_end=True)}
            return r.event("error", code=failure.code, message=failure.message, param=None, **error)
        last = (
            "response.completed" if result.done_reason is DoneReason.STOP else "response.incomplete"
        )
        logprobs = r.finish_text()
        return (
            r.event("response.output_text.done", **self._where(), text=r.text, logprobs=logprobs)
            + r.event("response.content_part.done", **self._where(), part=r.part())
            + r.event(
                "response.output_item.done", output_index=0, item=r.item(r.item_status(result))
            )
            + r.event(last, response=r.whole(result))
        )


class _ResponseCall:
    def __init__(
        self, edge: Edge, request: ChatRequest, body: ResponseBody, sampling: dict[str, object]
    ) -> None:
        self.request = request
        self._context = edge.context
        self._body = body
        self._sampling = sampling

    def _response(self, generation: Generation) -> _Response:
        response_id = "resp_" + self._context.request_id
        return _Response(response_id, generation.model_id, self._body, self._sampling)

    def framing(self, generation: Generation) -> StreamFraming:
        return _ResponseFraming(self._response(generation), self._context)

    def whole(self, generation: Generation, text: str, result: GenerationResult) -> object:
        response = self._response(generation)
        response.text = text
        response.logprobs = list(result.logprobs or ())
        response.finish_text()
        return response.whole(result)


class ResponsesProtocol:
    """``POST /v1/responses``: the input becomes a :class:`ChatRequest`."""

    errors = OPENAI_ERRORS
    early_end_in_answer = False

    async def decode(self, edge: Edge, body: bytes) -> _ResponseCall:
        decoded = decode_json(body, ResponseBody)
        edge.context.param_names = {
            "prompt": "input",
            "messages": "input",
            "format": "text.format",
            "logprobs": "top_logprobs",
            **RESPONSES_SAMPLING.param_names,
        }
        sampling = sampling_of(body, RESPONSES_SAMPLING)
        generate = _chat_request(decoded, sampling, edge)
        return _ResponseCall(edge, generate, decoded, sampling)


RESPONSES = ResponsesProtocol()
