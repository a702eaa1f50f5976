"""The one table from error code to HTTP status, and the JSON error body."""

from __future__ import annotations

import math

import orjson
from starlette.responses import Response

from modeld import errors
from modeld.config import ConfigError

__all__ = ["STATUS_BY_ERROR", "error_response", "status_for"]

STATUS_BY_ERROR: dict[type[errors.ModeldError], int] = {
    errors.InvalidRequest: 400,
    errors.InvalidModelId: 400,
    errors.PayloadTooLarge: 413,
    errors.RequestBodyTimeout: 408,
    ConfigError: 400,
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
    errors.RequestNotFound: 404,
    errors.ForbiddenHost: 403,
    errors.InferTimeout: 504,
    errors.EngineError: 500,
    errors.TokenLoopUnavailable: 500,
    errors.MemoryProbeError: 503,
    errors.ModeldError: 500,
}


def status_for(error: errors.ModeldError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def error_body(code: str, message: str, request_id: str, field: str | None = None) -> bytes:
    detail: dict[str, str] = {"code": code, "message": message, "request_id": request_id}
    if field:
        detail["field"] = field
    return orjson.dumps({"error": detail})


def error_response(error: errors.ModeldError, request_id: str) -> Response:
    headers = {"X-Request-ID": request_id}
    if isinstance(error, errors.PayloadTooLarge | errors.RequestBodyTimeout):
        # The body was not read: the connection cannot be reused, so say so.
        headers["Connection"] = "close"
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after_s)))
    body = error_body(error.code, error.message, request_id, getattr(error, "field", None))
    return Response(body, status_for(error), headers, media_type="application/json")
