"""Ollama's API under ``/api``: thin translations onto the same ``ModelManager`` calls as
modeld's own routes (docs/compat.md)."""

from __future__ import annotations

from starlette.routing import Route

from modeld.api.ollama.embed import embed, embeddings
from modeld.api.ollama.facts import ModelFacts
from modeld.api.ollama.generate import Generating
from modeld.api.ollama.models import ModelListings, unsupported, version

__all__ = ["ollama_routes"]


def ollama_routes() -> list[Route]:
    facts = ModelFacts()
    listings = ModelListings(facts)
    generating = Generating(facts)
    return [
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", listings.tags, methods=["GET"]),
        Route("/api/ps", listings.ps, methods=["GET"]),
        Route("/api/show", listings.show, methods=["POST"]),
        Route("/api/generate", generating.generate, methods=["POST"]),
        Route("/api/chat", generating.chat, methods=["POST"]),
        Route("/api/embed", embed, methods=["POST"]),
        Route("/api/embeddings", embeddings, methods=["POST"]),
        Route("/api/pull", unsupported, methods=["POST"]),
        Route("/api/push", unsupported, methods=["POST"]),
        Route("/api/create", unsupported, methods=["POST"]),
        Route("/api/copy", unsupported, methods=["POST"]),
        Route("/api/delete", unsupported, methods=["DELETE"]),
        Route("/api/blobs/{digest}", unsupported, methods=["HEAD", "POST"]),
    ]
