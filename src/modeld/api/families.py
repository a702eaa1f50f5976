"""The protocol families the app serves, each mounted under its prefix with its own error
shape. Adding a protocol family is one folder (its routes, wire bodies, framing and
:class:`~modeld.api.protocol.ApiFamily`) and one line here."""

from __future__ import annotations

from starlette.middleware import Middleware
from starlette.middleware.exceptions import ExceptionMiddleware
from starlette.routing import BaseRoute, Mount

from modeld.api.errors import ErrorShape, exception_handlers
from modeld.api.ollama import OLLAMA
from modeld.api.openai import OPENAI
from modeld.api.protocol import ApiFamily
from modeld.api.routes import NATIVE

__all__ = ["FAMILIES", "error_shape_for", "family_for", "mounted_routes"]

FAMILIES: tuple[ApiFamily, ...] = (OPENAI, OLLAMA, NATIVE)
"""Longest prefix first; modeld's own routes (prefix "") last: they take the rest."""


def family_for(path: str) -> ApiFamily:
    """The family a path belongs to (for answers made before routing: a refused Host, a
    missing API key, a lost Ray replica)."""
    for family in FAMILIES:
        if family.prefix and (path == family.prefix or path.startswith(family.prefix + "/")):
            return family
    return NATIVE


def error_shape_for(path: str) -> ErrorShape:
    return family_for(path).errors


def mounted_routes() -> list[BaseRoute]:
    """Every family's routes, each mounted with its own exception handlers."""
    return [
        Mount(
            family.prefix,
            routes=list(family.routes()),
            middleware=[
                Middleware(ExceptionMiddleware, handlers=exception_handlers(family.errors))
            ],
        )
        for family in FAMILIES
    ]
