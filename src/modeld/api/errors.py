"""Every way an error becomes an HTTP answer: the one table from error to status, the JSON
error body, and the handlers the app and the middleware use.

The body takes the shape of the protocol the path belongs to, with the same status:
modeld's ``{"error": {"code", "message", "request_id"}}``, or under ``/api/`` Ollama's
``{"error": "<message>"}`` (its clients read the error as a string).
"""

from __future__ import annotations

import math

import orjson
from loguru import logger
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from modeld import errors

__all__ = [
    "EXCEPTION_HANDLERS",
    "OLLAMA_PREFIX",
    "STATUS_BY_ERROR",
    "count_rejection",
    "error_body",
    "error_headers",
    "error_response",
    "internal_error_response",
    "status_for",
]

STATUS_BY_ERROR: dict[type[errors.ModeldError], int] = {
    errors.InvalidRequest: 400,
    errors.InvalidModelId: 400,
    errors.PayloadTooLarge: 413,
    errors.RequestBodyTimeout: 408,
    errors.HeadersTooLarge: 431,
    errors.ConfigError: 400,
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
    errors.ModeldError: 500,
}
# Refusals that say "not now" rather than "never": counted by reason in /metrics.
_REJECTION_STATUSES = frozenset({429, 503, 504})
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}
OLLAMA_PREFIX = "/api/"


def status_for(error: errors.ModeldError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_body(
    code: str, message: str, request_id: str, field: str | None = None, *, path: str = ""
) -> bytes:
    if path.startswith(OLLAMA_PREFIX):
        return orjson.dumps({"error": message})
    detail: dict[str, str] = {"code": code, "message": message, "request_id": request_id}
    if field:
        detail["field"] = field
    return orjson.dumps({"error": detail})


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


def error_response(error: errors.ModeldError, request_id: str, path: str = "") -> Response:
    field = getattr(error, "field", None)
    body = error_body(error.code, error.message, request_id, field, path=path)
    return Response(body, status_for(error), error_headers(error), media_type="application/json")


def internal_error_response(request_id: str, path: str = "") -> Response:
    body = error_body("internal_error", "internal server error", request_id, path=path)
    return Response(body, 500, media_type="application/json")


def _request_id(request: Request) -> str:
    return str(request.scope.get("state", {}).get("request_id", ""))


def count_rejection(request: Request, error: errors.ModeldError) -> None:
    """A "not now" refusal counts in /metrics by reason, on every route."""
    status = status_for(error)
    if status in _REJECTION_STATUSES:
        request.app.state.metrics.rejections.labels(error.code, str(status)).inc()


async def _modeld_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, errors.ModeldError)
    count_rejection(request, exc)
    return error_response(exc, _request_id(request), request.url.path)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    body = error_body(code, str(exc.detail), _request_id(request), path=request.url.path)
    return Response(body, exc.status_code, exc.headers, media_type="application/json")


def log_unexpected(exc: BaseException, path: str) -> None:
    """A bug reached the top of a request: one JSON log line with its traceback."""
    logger.opt(exception=exc).error("unhandled error", path=path, error=repr(exc))


EXCEPTION_HANDLERS = {errors.ModeldError: _modeld_error, HTTPException: _http_error}
