"""What the edge learns about one request, typed: the one place the layers of the HTTP
stack (request-id middleware, API keys, handlers, the access log, tracing) leave facts
for each other, instead of string keys in ``scope["state"]``.

The middleware creates it first (:func:`open_context`); everything after reads it with
:func:`context_of`.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RequestContext", "context_of", "open_context"]

_SCOPE_KEY = "modeld.context"


@dataclass(slots=True)
class RequestContext:
    """One request's facts as the edge learns them.

    ``model`` is the model id it asked for (the access log's and the trace's ``model``),
    ``model_name`` the model as the client spelled it (an Ollama name such as
    ``gemma:latest``), ``queue_ms`` how long its generation waited, ``key_id`` the API
    key's id, ``param_names`` how modeld's field names read in this request's protocol
    (``max_tokens`` is ``max_output_tokens`` in ``/v1/responses``), for its errors.
    """

    request_id: str = ""
    model: str | None = None
    model_name: str | None = None
    queue_ms: float | None = None
    key_id: str | None = None
    param_names: Mapping[str, str] = field(default_factory=dict)

    def wire_name(self, field_name: str | None) -> str | None:
        """``field_name`` as this request's protocol calls it."""
        if field_name is None:
            return None
        return self.param_names.get(field_name, field_name)


def open_context(scope: MutableMapping[str, Any], request_id: str) -> RequestContext:
    """A new context for ``scope`` (the request-id middleware, first on every request)."""
    context = RequestContext(request_id=request_id)
    scope[_SCOPE_KEY] = context
    return context


def context_of(scope: MutableMapping[str, Any]) -> RequestContext:
    """The request's context; one made on the spot for a scope no middleware saw (an app
    mounted without :class:`~modeld.api.middleware.RequestContextMiddleware`)."""
    context = scope.get(_SCOPE_KEY)
    if context is None:
        context = RequestContext()
        scope[_SCOPE_KEY] = context
    assert isinstance(context, RequestContext)
    return context
