"""``POST /api/embed`` and the legacy ``POST /api/embeddings``: ``ModelManager.embed()``,
the same engine as ``/v1/embeddings``; vectors are L2-normalised."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response

from modeld.api.bodies import decode_body, read_body
from modeld.api.ollama.names import model_id_for, naming
from modeld.api.ollama.wire import EmbedBody, EmbeddingsBody, json_response
from modeld.errors import InvalidRequest
from modeld.scheduling.manager import ModelManager
from modeld.types import EmbeddingResult

__all__ = ["embed", "embeddings"]

_NS_PER_MS = 1_000_000


def _manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.manager
    return manager


async def _embed(
    request: Request, name: str, inputs: list[str], keep_alive: str | float | None
) -> EmbeddingResult:
    manager = _manager(request)
    if not name:
        raise InvalidRequest("model is required", field="model")
    model_id = request.scope["state"]["model"] = model_id_for(name, manager.settings)
    request_id = str(request.scope["state"]["request_id"])
    return await naming(
        name, lambda: manager.embed(model_id, inputs, request_id=request_id, keep_alive=keep_alive)
    )


async def embed(request: Request) -> Response:
    settings = _manager(request).settings
    raw_body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    body = decode_body(raw_body, EmbedBody)
    if not body.input:  # as in Ollama: no input loads the model, and answers no vector
        if not body.model:
            raise InvalidRequest("model is required", field="model")
        manager = _manager(request)
        model_id = request.scope["state"]["model"] = model_id_for(body.model, settings)
        await naming(body.model, lambda: manager.load(model_id, keep_alive=body.keep_alive))
        return json_response({"model": body.model, "embeddings": []})
    inputs = [body.input] if isinstance(body.input, str) else body.input
    result = await _embed(request, body.model, inputs, body.keep_alive)
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
    settings = _manager(request).settings
    raw_body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    body = decode_body(raw_body, EmbeddingsBody)
    if not body.prompt:  # Ollama answers an empty prompt with an empty vector
        if not body.model:
            raise InvalidRequest("model is required", field="model")
        return json_response({"embedding": []})
    result = await _embed(request, body.model, [body.prompt], body.keep_alive)
    return json_response({"embedding": result.embeddings[0]})
