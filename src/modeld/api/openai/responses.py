"""``POST /v1/responses`` for text: ``input`` (a string or messages), ``instructions``,
streamed as the Responses API's typed events. Stateless: no tools, no stored responses
(``previous_response_id`` and ``background`` are refused by name).

The same ``ModelManager.stream`` as every chat: the input becomes a :class:`ChatRequest`.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from modeld.api.bodies import convert_fields, decode_json, read_body
from modeld.api.openai.errors import (
    ENDED_EARLY_STATUS,
    PARAM_NAMES_KEY,
    UnsupportedParam,
    ended_early_response,
    openai_error_body,
    openai_route,
)
from modeld.api.openai.framing import FINISHED, SSE, usage
from modeld.api.openai.translate import (
    messages_from,
    msgspec_message,
    response_format,
    with_defaults,
)
from modeld.api.openai.wire import ResponseBody
from modeld.api.streaming import GenerationResponse, collect_watched, one_line_json, start_watched
from modeld.errors import InvalidRequest
from modeld.scheduling.manager import ModelManager
from modeld.types import ChatRequest, Chunk, DoneReason, GenerationResult

__all__ = ["create_response"]

_PART_TYPES = frozenset({"input_text", "output_text", "text"})


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


def _chat_request(body: ResponseBody, manager: ModelManager) -> ChatRequest:
    if body.tools:
        raise _unsupported("tools", "tool calling is not supported for this model")
    if body.previous_response_id:
        raise _unsupported("previous_response_id", "modeld stores no responses; send the input")
    if body.background:
        raise _unsupported("background", "background responses are not supported")
    text_format = (body.text or {}).get("format")
    if isinstance(text_format, dict) and text_format.get("type") == "json_schema":
        text_format = {"type": "json_schema", "json_schema": text_format}
    fields: dict[str, object] = {
        "messages": [msgspec_message(m) for m in messages_from(_messages(body))],
        "model": body.model,
        "format": response_format(text_format),
    }
    for name, value in (
        ("max_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
    ):
        if value is not None:
            fields[name] = value
    return convert_fields(with_defaults(fields, body.model, manager.sampling_defaults), ChatRequest)


class _Response:
    """One response object as it grows: the Responses API repeats it in its events."""

    def __init__(self, response_id: str, model: str, body: ResponseBody) -> None:
        self.id = response_id
        self.item_id = "msg_" + response_id.removeprefix("resp_")
        self.created_at = int(time.time())
        self.model = model
        self.body = body
        self.text = ""
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
        return {"type": "output_text", "text": self.text, "annotations": []}

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
            "max_output_tokens": self.body.max_output_tokens,
            "model": self.model,
            "output": [self.item("completed")] if finished else [],
            "parallel_tool_calls": False,
            "previous_response_id": None,
            "temperature": self.body.temperature,
            "top_p": self.body.top_p,
            "tool_choice": "none",
            "tools": [],
            "text": {"format": {"type": "text"}},
            "truncation": "disabled",
            "usage": _usage(result) if result is not None else None,
            "metadata": {},
        }

    def event(self, kind: str, **fields: Any) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: ".encode() + one_line_json(data) + b"\n\n"


def _usage(result: GenerationResult) -> dict[str, object]:
    counts = usage(result)
    return {
        "input_tokens": counts["prompt_tokens"],
        "input_tokens_details": counts["prompt_tokens_details"],
        "output_tokens": counts["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": counts["total_tokens"],
    }


class _ResponseFraming:
    """The Responses API's events: created, in_progress, the output item and its text
    part added, text deltas, then each closed, then completed (or incomplete at
    ``max_output_tokens``); a generation that ends early ends with an ``error`` event."""

    media_type = SSE

    def __init__(self, response: _Response) -> None:
        self._r = response

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
        return self._r.event(
            "response.output_text.delta", **self._where(), delta=chunk.text, logprobs=[]
        )

    def end(self, result: GenerationResult) -> bytes:
        r = self._r
        if result.done_reason not in FINISHED:
            status = ENDED_EARLY_STATUS[result.done_reason]
            code = (result.error or {}).get("code", str(result.done_reason))
            message = (result.error or {}).get(
                "message"
            ) or f"the generation ended early: {result.done_reason}"
            error = orjson.loads(openai_error_body(code, message, status, None, result.request_id))
            return r.event("error", code=code, message=message, param=None, **error)
        last = (
            "response.completed" if result.done_reason is DoneReason.STOP else "response.incomplete"
        )
        return (
            r.event("response.output_text.done", **self._where(), text=r.text, logprobs=[])
            + r.event("response.content_part.done", **self._where(), part=r.part())
            + r.event("response.output_item.done", output_index=0, item=r.item("completed"))
            + r.event(last, response=r.whole(result))
        )


@openai_route
async def create_response(request: Request) -> Response:
    manager: ModelManager = request.app.state.manager
    settings = manager.settings
    state: dict[str, Any] = request.scope.setdefault("state", {})
    body = decode_json(
        await read_body(request, settings.max_body_bytes, settings.body_timeout), ResponseBody
    )
    state[PARAM_NAMES_KEY] = {
        "prompt": "input",
        "messages": "input",
        "format": "text.format",
        "max_tokens": "max_output_tokens",
    }
    generate = _chat_request(body, manager)
    request_id = str(state.get("request_id", ""))
    state["model"] = generate.model or settings.default_model
    owner = manager.stream(generate, request_id=request_id)
    generation = await start_watched(request.receive, owner)
    response = _Response("resp_" + request_id, generation.model_id, body)
    if body.stream:
        return GenerationResponse(owner, generation, _ResponseFraming(response))
    response.text = await collect_watched(request.receive, owner, generation)
    result = generation.result
    assert result is not None
    if result.done_reason not in FINISHED:
        return ended_early_response(result)
    return Response(orjson.dumps(response.whole(result)), 200, media_type="application/json")
