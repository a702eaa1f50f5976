"""OpenAI's API under ``/v1`` (docs/compat.md)."""

from __future__ import annotations

from modeld.api.openai.routes import OPENAI

__all__ = ["OPENAI"]
