"""Ollama's API under ``/api``: thin translations onto the same ``ModelManager`` calls as
modeld's own routes (docs/compat.md)."""

from __future__ import annotations

from starlette.routing import BaseRoute, Route

from modeld.api.ollama.embed import embed, embeddings
from modeld.api.ollama.errors import OLLAMA_ERRORS
from modeld.api.ollama.facts import ModelFacts
from modeld.api.ollama.generate import OllamaChat, OllamaGenerate
from modeld.api.ollama.models import ModelListings, unsupported, version
from modeld.api.protocol import ApiFamily, endpoint

__all__ = ["OLLAMA", "ollama_routes"]


def ollama_routes() -> list[BaseRoute]:
    """The routes below ``/api`` (mounted there with Ollama's error shape)."""
    facts = ModelFacts()
    listings = ModelListings(facts)
    return [
        Route("/version", version, methods=["GET"]),
        Route("/tags", listings.tags, methods=["GET"]),
        Route("/ps", listings.ps, methods=["GET"]),
        Route("/show", listings.show, methods=["POST"]),
        Route("/generate", endpoint(OllamaGenerate(facts)), methods=["POST"]),
        Route("/chat", endpoint(OllamaChat()), methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/pull", unsupported, methods=["POST"]),
        Route("/push", unsupported, methods=["POST"]),
        Route("/create", unsupported, methods=["POST"]),
        Route("/copy", unsupported, methods=["POST"]),
        Route("/delete", unsupported, methods=["DELETE"]),
        Route("/blobs/{digest}", unsupported, methods=["HEAD", "POST"]),
    ]


OLLAMA = ApiFamily("ollama", "/api", OLLAMA_ERRORS, ollama_routes)
