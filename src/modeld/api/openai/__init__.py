"""The OpenAI-compatible API under ``/v1``: a thin translation onto ``ModelManager``.

Read docs/compat.md for every field and what modeld does with it.
"""

from modeld.api.openai.routes import build_openai_routes

__all__ = ["build_openai_routes"]
