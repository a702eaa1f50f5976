"""modeld's errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``
with modeld's codes and statuses, ``Retry-After`` as on ``/infer``, and
``x-should-retry: false`` on failures a retry cannot fix (the client otherwise retries
every 5xx twice). A stream that ends early says so in an SSE ``error`` event, on which
the client raises instead of returning a truncated answer.
"""

from __future__ import annotations

import orjson

from modeld import errors
from modeld.api.context import RequestContext
from modeld.api.errors import ErrorShape, Failure
from modeld.api.streaming import one_line_json

__all__ = ["OPENAI_ERRORS", "OpenAIErrors", "error_object"]

_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}


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


def error_object(failure: Failure, *, early_end: bool = False) -> dict[str, object]:
    """The ``error`` object of OpenAI's error bodies and events. A stream that ended
    early (evicted, timeout, cancelled by ``DELETE /requests/{id}``) was a valid request
    the server did not finish: ``server_error`` whatever the status an unstreamed answer
    would have had (``cancelled`` is 499)."""
    return {
        "message": failure.message,
        "type": "server_error" if early_end else _type_for(failure.status),
        "param": failure.param,
        "code": failure.code,
        "request_id": failure.request_id,
    }


class OpenAIErrors(ErrorShape):
    """The error shape of every ``/v1`` route."""

    def failure(self, error: errors.ModeldError, context: RequestContext) -> Failure:
        failure = super().failure(error, context)
        if failure.param is None and isinstance(
            error, errors.ModelNotFound | errors.NoDefaultModel
        ):
            return Failure(
                failure.code, failure.message, failure.status, "model", failure.request_id
            )
        return failure

    def body(self, failure: Failure) -> bytes:
        return orjson.dumps({"error": error_object(failure)})

    def headers(self, error: errors.ModeldError) -> dict[str, str]:
        headers = super().headers(error)
        if _is_permanent(error):
            headers["x-should-retry"] = "false"
        return headers

    def stream_end(self, failure: Failure, model: str) -> bytes:
        """The SSE event that ends a stream cut short; no ``[DONE]`` follows it."""
        error = error_object(failure, early_end=True)
        return b"data: " + one_line_json({"error": error}) + b"\n\n"


OPENAI_ERRORS = OpenAIErrors()
