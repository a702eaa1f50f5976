"""Every way an error becomes an HTTP answer: the one table from error to status, the one
table from a generation's early end to its error, and :class:`ErrorShape`, the body a
protocol family gives any :class:`~modeld.errors.ModeldError` (modeld's own here; OpenAI's
and Ollama's subclass it). Each family is mounted with its own shape's handlers
(:func:`exception_handlers`), so no code here looks at the path.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from loguru import logger
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from modeld import errors
from modeld.api.context import RequestContext, context_of
from modeld.types import DoneReason, GenerationResult

__all__ = [
    "EARLY_END",
    "FINISHED",
    "STATUS_BY_ERROR",
    "ErrorShape",
    "Failure",
    "UnsupportedParam",
    "count_rejection",
    "early_end_error",
    "error_headers",
    "exception_handlers",
    "log_unexpected",
    "status_for",
]

STATUS_BY_ERROR: dict[type[errors.ModeldError], int] = {
    errors.InvalidRequest: 400,
    errors.InvalidModelId: 400,
    errors.PayloadTooLarge: 413,
    errors.RequestBodyTimeout: 408,
    errors.HeadersTooLarge: 431,
    errors.ConfigError: 400,
    errors.ContextLengthExceeded: 400,
    errors.NoChatTemplate: 400,
    errors.ChatTemplateError: 400,
    errors.ClientDisconnected: 499,
    errors.ModelNotFound: 404,
    errors.NoDefaultModel: 400,
    errors.ModelInvalid: 422,
    errors.ModelTooLarge: 507,
    errors.ModelLoadFailed: 500,
    errors.ModelCoolingDown: 503,
    errors.Overloaded: 429,
    errors.QueueFull: 429,
    errors.QueueTimeout: 429,
    errors.TooManyInflight: 429,
    errors.MemoryBusy: 503,
    errors.ShuttingDown: 503,
    errors.ResourcesExhausted: 503,
    errors.ModelsDirUnavailable: 503,
    errors.RequestNotFound: 404,
    errors.ForbiddenHost: 403,
    errors.Unauthorized: 401,
    errors.InferTimeout: 504,
    errors.EngineError: 500,
    errors.TokenLoopUnavailable: 500,
    errors.MemoryProbeError: 503,
    errors.Unsupported: 501,
    errors.ModelUnloaded: 503,
    errors.ReplicaUnavailable: 503,
    errors.ReplicaLost: 502,
    errors.ReplicaNotFound: 404,
    errors.ModeldError: 500,
}
# Refusals that say "not now" rather than "never": counted by reason in /metrics.
_REJECTION_STATUSES = frozenset({429, 503, 504})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}

FINISHED = frozenset({DoneReason.STOP, DoneReason.LENGTH})
"""The end reasons of a generation that ran to its end; any other ended it early."""
EARLY_END: dict[DoneReason, type[errors.ModeldError]] = {
    DoneReason.CANCELLED: errors.ClientDisconnected,
    DoneReason.EVICTED: errors.ModelUnloaded,
    DoneReason.IDLE: errors.ModelUnloaded,
    DoneReason.TIMEOUT: errors.InferTimeout,
    DoneReason.SHUTDOWN: errors.ShuttingDown,
    DoneReason.ERROR: errors.EngineError,
}
"""What an early end means, for every protocol: the error (so the status, through
:data:`STATUS_BY_ERROR`) an unstreamed answer gets, and the one a stream's last line
says."""


class UnsupportedParam(errors.InvalidRequest):
    """A 400 whose ``field`` is already the protocol's own parameter name (``n``,
    ``tools``, ``messages[2].content``), not one of modeld's to translate."""


def status_for(error: errors.ModeldError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def early_end_error(result: GenerationResult) -> errors.ModeldError | None:
    """None for a generation that ran to its end; else the error that says why not. Its
    ``code`` is the engine's (``result.error``) or the end reason (``evicted``)."""
    if result.done_reason in FINISHED:
        return None
    cause = f": {result.error['message']}" if result.error and result.error.get("message") else ""
    tokens = result.metrics.completion_tokens
    error_type = EARLY_END.get(result.done_reason, errors.EngineError)
    error = error_type(
        f"the generation ended early ({result.done_reason}) after {tokens} tokens{cause}"
    )
    error.code = (result.error or {}).get("code") or str(result.done_reason)
    return error


def error_headers(error: errors.ModeldError) -> dict[str, str]:
    """``Retry-After`` for "not now" errors, ``Connection: close`` when the body was not
    read: the same on every route, whatever the body's protocol."""
    headers: dict[str, str] = {}
    unread = errors.PayloadTooLarge | errors.RequestBodyTimeout | errors.HeadersTooLarge
    if isinstance(error, unread):
        # The body was not read: the connection cannot be reused, so say so.
        headers["Connection"] = "close"
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    return headers


@dataclass(frozen=True, slots=True)
class Failure:
    """An error as every protocol's body needs it: its code, message, status, the
    parameter it names (in the request's own protocol) and the request's id."""

    code: str
    message: str
    status: int
    param: str | None
    request_id: str


class ErrorShape:
    """modeld's own error body, ``{"error": {"code", "message", "request_id", "field"}}``,
    and the last line of an NDJSON stream cut short. A protocol family with a shape of
    its own subclasses it and overrides :meth:`body` (and :meth:`stream_end`)."""

    def failure(self, error: errors.ModeldError, context: RequestContext) -> Failure:
        field = getattr(error, "field", None)
        param = field if isinstance(error, UnsupportedParam) else context.wire_name(field)
        return Failure(error.code, error.message, status_for(error), param, context.request_id)

    def body(self, failure: Failure) -> bytes:
        detail = {"code": failure.code, "message": failure.message}
        detail["request_id"] = failure.request_id
        if failure.param:
            detail["field"] = failure.param
        return orjson.dumps({"error": detail})

    def headers(self, error: errors.ModeldError) -> dict[str, str]:
        return error_headers(error)

    def stream_end(self, failure: Failure, model: str) -> bytes:
        """The last line of a stream that could not finish (e.g. its Ray replica died)."""
        error = {"code": failure.code, "message": failure.message}
        error["request_id"] = failure.request_id
        terminal = {"done": True, "done_reason": "error", "model": model}
        terminal["request_id"] = failure.request_id
        return orjson.dumps({**terminal, "error": error}) + b"\n"

    def response(self, error: errors.ModeldError, context: RequestContext) -> Response:
        failure = self.failure(error, context)
        return Response(
            self.body(failure), failure.status, self.headers(error), media_type="application/json"
        )

    def internal_error(self, context: RequestContext) -> Response:
        failure = Failure("internal_error", "internal server error", 500, None, context.request_id)
        return Response(self.body(failure), 500, media_type="application/json")

    def http_error(self, exc: HTTPException, context: RequestContext) -> Response:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        failure = Failure(code, str(exc.detail), exc.status_code, None, context.request_id)
        return Response(self.body(failure), exc.status_code, exc.headers, "application/json")


def count_rejection(request: Request, error: errors.ModeldError) -> None:
    """A "not now" refusal counts in /metrics by reason, on every route."""
    status = status_for(error)
    if status in _REJECTION_STATUSES:
        request.app.state.metrics.rejections.labels(error.code, str(status)).inc()


Handler = Callable[[Request, Exception], Awaitable[Response]]


def exception_handlers(shape: ErrorShape) -> dict[Any, Handler]:
    """The handlers of one mounted protocol family: its errors in its own shape."""

    async def modeld_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, errors.ModeldError)
        count_rejection(request, exc)
        return shape.response(exc, context_of(request.scope))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return shape.http_error(exc, context_of(request.scope))

    return {errors.ModeldError: modeld_error, HTTPException: http_error}


def log_unexpected(exc: BaseException, path: str) -> None:
    """A bug reached the top of a request: one JSON log line with its traceback."""
    logger.opt(exception=exc).error("unhandled error", path=path, error=repr(exc))
