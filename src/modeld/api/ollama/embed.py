"""``POST /api/embed`` and the legacy ``POST /api/embeddings``: ``ModelManager.embed()``,
the same engine as ``/v1/embeddings``; vectors are L2-normalised."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from modeld.api.bodies import decode_body
from modeld.api.edge import Edge
from modeld.api.ollama.names import model_id_for, naming
from modeld.api.ollama.wire import EmbedBody, EmbeddingsBody
from modeld.api.protocol import json_response
from modeld.errors import InvalidRequest
from modeld.types import EmbeddingResult

__all__ = ["embed", "embeddings"]

_NS_PER_MS = 1_000_000


def _model_id(edge: Edge, name: str) -> str:
    """The id of the model the client named (the access log's ``model``); a 400 without
    one."""
    if not name:
        raise InvalidRequest("model is required", field="model")
    edge.context.model_name = name
    model_id = edge.context.model = model_id_for(name, edge.settings)
    return model_id


async def _embed(
    edge: Edge, name: str, inputs: list[str], keep_alive: str | float | None, truncate: bool
) -> EmbeddingResult:
    model_id = _model_id(edge, name)
    return await naming(
        name, lambda: edge.embed(model_id, inputs, keep_alive=keep_alive, truncate=truncate)
    )


async def embed(request: Request) -> Response:
    edge = Edge.of(request)
    body = decode_body(await edge.body(), EmbedBody)
    if not body.input:  # as in Ollama: no input loads the model, and answers no vector
        model_id = _model_id(edge, body.model)
        load = edge.manager.load
        await naming(body.model, lambda: load(model_id, keep_alive=body.keep_alive))
        return json_response({"model": body.model, "embeddings": []})
    inputs = [body.input] if isinstance(body.input, str) else body.input
    result = await _embed(edge, body.model, inputs, body.keep_alive, body.truncate)
    width = len(result.embeddings[0])
    if body.dimensions is not None and body.dimensions != width:
        raise InvalidRequest(
            f"dimensions: this model's embeddings have {width} dimensions", field="dimensions"
        )
    return json_response(
        {
            "model": body.model,
            "embeddings": result.embeddings,
            "total_duration": round(result.total_ms * _NS_PER_MS),
            "load_duration": round(result.load_ms * _NS_PER_MS),
            "prompt_eval_count": result.prompt_tokens,
        }
    )


async def embeddings(request: Request) -> Response:
    edge = Edge.of(request)
    body = decode_body(await edge.body(), EmbeddingsBody)
    if not body.prompt:  # Ollama answers an empty prompt with an empty vector
        if not body.model:
            raise InvalidRequest("model is required", field="model")
        return json_response({"embedding": []})
    result = await _embed(edge, body.model, [body.prompt], body.keep_alive, True)
    return json_response({"embedding": result.embeddings[0]})
