"""modeld's errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``
with modeld's codes and statuses, ``Retry-After`` as on ``/infer``, and
``x-should-retry: false`` on failures a retry cannot fix (the client otherwise retries
every 5xx twice). A stream that ends early says so in an SSE ``error`` event, on which
the client raises instead of returning a truncated answer.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping

import orjson
from starlette.requests import Request
from starlette.responses import Response

from modeld import errors
from modeld.api.errors import count_rejection, error_headers, status_for
from modeld.api.streaming import one_line_json
from modeld.types import DoneReason, GenerationResult

__all__ = [
    "ENDED_EARLY_STATUS",
    "PARAM_NAMES_KEY",
    "UnsupportedParam",
    "ended_early_response",
    "error_event",
    "openai_error_body",
    "openai_route",
]

Endpoint = Callable[[Request], Awaitable[Response]]
# Where a handler leaves how modeld's field names read in the request it was sent
# ("prompt" is "messages" in a chat), for the errors raised below the API.
PARAM_NAMES_KEY = "openai_param_names"
# A generation that ended early, answered without streaming: its status.
ENDED_EARLY_STATUS = {
    DoneReason.TIMEOUT: 504,
    DoneReason.EVICTED: 503,
    DoneReason.SHUTDOWN: 503,
    DoneReason.ERROR: 500,
    DoneReason.CANCELLED: 499,
}
_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


class UnsupportedParam(errors.InvalidRequest):
    """A 400 whose ``field`` is already OpenAI's parameter name (``n``, ``tools``,
    ``messages[2].content``), not one of modeld's to translate."""


def _is_permanent(error: errors.ModeldError) -> bool:
    """Retrying cannot help: the file or the build is what it is."""
    if isinstance(error, errors.ModelCoolingDown):
        return False  # the backoff ends; Retry-After says when
    return isinstance(
        error,
        errors.ModelTooLarge
        | errors.ModelInvalid
        | errors.ModelLoadFailed
        | errors.TokenLoopUnavailable
        | errors.EngineError,
    )


def _type_for(status: int) -> str:
    if status in _TYPES:
        return _TYPES[status]
    return "invalid_request_error" if status < 500 else "server_error"


def openai_error_body(
    code: str, message: str, status: int, param: str | None, request_id: str
) -> bytes:
    error = {
        "message": message,
        "type": _type_for(status),
        "param": param,
        "code": code,
        "request_id": request_id,
    }
    return orjson.dumps({"error": error})


def _response(
    code: str,
    message: str,
    status: int,
    param: str | None,
    request_id: str,
    headers: dict[str, str],
) -> Response:
    body = openai_error_body(code, message, status, param, request_id)
    return Response(body, status, headers, media_type="application/json")


def openai_route(handler: Endpoint) -> Endpoint:
    """An endpoint whose modeld errors are answered in OpenAI's shape."""

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except errors.ModeldError as error:
            count_rejection(request, error)
            state = request.scope.get("state", {})
            names: Mapping[str, str] = state.get(PARAM_NAMES_KEY, {})
            field = getattr(error, "field", None)
            headers = error_headers(error)
            if _is_permanent(error):
                headers["x-should-retry"] = "false"
            if field is None and isinstance(error, errors.ModelNotFound | errors.NoDefaultModel):
                field = "model"
            if isinstance(error, UnsupportedParam):
                param = field
            else:
                param = names.get(field, field) if field else None
            status = status_for(error)
            request_id = str(state.get("request_id", ""))
            return _response(error.code, error.message, status, param, request_id, headers)

    return endpoint


def ended_early_response(result: GenerationResult) -> Response:
    """A generation that ended neither ``stop`` nor ``length``, answered as an error:
    never a truncated text that looks whole."""
    status = ENDED_EARLY_STATUS[result.done_reason]
    code, message = _ended_early(result)
    headers = {"x-should-retry": "false"} if result.done_reason is DoneReason.ERROR else {}
    return _response(code, message, status, None, result.request_id, headers)


def error_event(result: GenerationResult) -> bytes:
    """The SSE event that ends a stream cut short; no ``[DONE]`` follows it."""
    code, message = _ended_early(result)
    status = ENDED_EARLY_STATUS[result.done_reason]
    body = openai_error_body(code, message, status, None, result.request_id)
    return b"data: " + one_line_json(orjson.loads(body)) + b"\n\n"  # a message may hold U+2028


def _ended_early(result: GenerationResult) -> tuple[str, str]:
    if result.error is not None:
        return result.error.get("code", "engine_error"), result.error.get("message", "")
    reason = str(result.done_reason)
    return reason, f"the generation ended early: {reason} (after {_tokens(result)} tokens)"


def _tokens(result: GenerationResult) -> int:
    return result.metrics.completion_tokens
