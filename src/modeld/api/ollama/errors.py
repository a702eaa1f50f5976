"""modeld's errors in Ollama's shape: ``{"error": "<message>"}`` with modeld's statuses
(its clients read the error as a string), and an ``{"error": ...}`` line that ends a
stream cut short, which the ``ollama`` client raises as ``ResponseError``."""

from __future__ import annotations

import orjson

from modeld import errors
from modeld.api.context import RequestContext
from modeld.api.errors import ErrorShape, Failure
from modeld.api.ollama.names import unknown_model
from modeld.api.streaming import ndjson_line

__all__ = ["OLLAMA_ERRORS", "OllamaErrors"]


class OllamaErrors(ErrorShape):
    """The error shape of every ``/api`` route."""

    def failure(self, error: errors.ModeldError, context: RequestContext) -> Failure:
        if isinstance(error, errors.ModelNotFound) and context.model_name:
            error = unknown_model(context.model_name)  # the name the client used
        return super().failure(error, context)

    def body(self, failure: Failure) -> bytes:
        return orjson.dumps({"error": failure.message})

    def stream_end(self, failure: Failure, model: str) -> bytes:
        return ndjson_line({"error": failure.message})


OLLAMA_ERRORS = OllamaErrors()
