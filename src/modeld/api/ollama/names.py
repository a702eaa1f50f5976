"""Ollama model names: ``<id>:latest`` on the way out; the id, ``<id>:latest``, the
file's stem (``gemma-3-270m-q4_k_m``, with or without ``:latest``), or a configured alias
(as it is, or with ``:latest`` added) on the way in.

Open WebUI appends ``:latest`` to any name without a tag and looks models up by it, so
every name modeld lists must be one it accepts back. Any other tag names no model.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

from modeld.errors import InvalidModelId, ModelNotFound
from modeld.registry import check_model_id
from modeld.settings.config import Settings

__all__ = ["LATEST", "model_id_for", "naming", "ollama_name", "unknown_model"]

T = TypeVar("T")

LATEST = "latest"
_SUFFIX = ".gguf"


def ollama_name(model_id: str) -> str:
    return f"{model_id}:{LATEST}"


def unknown_model(name: str) -> ModelNotFound:
    return ModelNotFound(f'model "{name}" not found')


def model_id_for(name: str, settings: Settings) -> str:
    """The model id an Ollama name stands for (the file may still not exist).

    Raises :class:`ModelNotFound` for another tag or a name no file could have (Ollama
    answers 404 for names it does not know, never 400).
    """
    base, colon, tag = name.rpartition(":")
    if not colon or "/" in tag:
        base, tag = name, LATEST
    for alias in (name, base) if tag == LATEST else (name,):
        resolved = settings.resolve_model_name(alias)
        if resolved != alias:
            return check_model_id(resolved)
    if tag != LATEST:
        raise unknown_model(name)
    model_id = base if base.endswith(_SUFFIX) else base + _SUFFIX
    try:
        return check_model_id(model_id)
    except InvalidModelId:
        raise unknown_model(name) from None


async def naming(name: str, call: Callable[[], Awaitable[T]]) -> T:
    """``call()``, with a missing model reported by the name the client used."""
    try:
        return await call()
    except ModelNotFound:
        raise unknown_model(name) from None
