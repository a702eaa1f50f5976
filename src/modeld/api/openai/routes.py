"""The OpenAI-compatible endpoints under ``/v1``: each translates the wire onto the same
``ModelManager`` calls as ``/infer`` (``stream``, ``embed``, ``models``) and back."""

from __future__ import annotations

import array
import base64
import sys
import time
from typing import Any

import orjson
from loguru import logger
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modeld.api.bodies import decode_json, read_body
from modeld.api.openai.errors import PARAM_NAMES_KEY, ended_early_response, openai_route
from modeld.api.openai.framing import FINISHED, ChatFraming, Completion, CompletionFraming
from modeld.api.openai.responses import create_response
from modeld.api.openai.translate import chat_request, completion_request, embedding_inputs
from modeld.api.openai.wire import ChatCompletionBody, CompletionBody, EmbeddingBody
from modeld.api.streaming import GenerationResponse, collect_watched, start_watched
from modeld.errors import InvalidRequest, ModelNotFound
from modeld.observability.logging import prompt_logging_enabled
from modeld.scheduling.manager import ModelManager
from modeld.types import ChatRequest, InferRequest

__all__ = ["build_openai_routes"]


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


def _manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.manager
    return manager


def _state(request: Request) -> dict[str, Any]:
    state: dict[str, Any] = request.scope.setdefault("state", {})
    return state


async def _body(request: Request) -> bytes:
    settings = _manager(request).settings
    return await read_body(request, settings.max_body_bytes, settings.body_timeout)


# ------------------------------------------------------------------------------ models


def _model_object(model_id: str, created_s: int) -> dict[str, object]:
    return {"id": model_id, "object": "model", "created": created_s, "owned_by": "modeld"}


async def _model_objects(manager: ModelManager) -> list[dict[str, object]]:
    """Every model file, then every configured alias of one (as its own entry)."""
    files = {m.id: m.identity.mtime_ns // 1_000_000_000 for m in await manager.models()}
    objects = [_model_object(model_id, created) for model_id, created in files.items()]
    for model_id, own in manager.settings.models.items():
        if model_id in files:
            objects += [_model_object(alias, files[model_id]) for alias in own.aliases]
    return objects


@openai_route
async def list_models(request: Request) -> Response:
    return _json({"object": "list", "data": await _model_objects(_manager(request))})


@openai_route
async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model_id"]
    for model in await _model_objects(_manager(request)):
        if model["id"] == name:
            return _json(model)
    _state(request)[PARAM_NAMES_KEY] = {"model": "model"}
    raise ModelNotFound(f"model {name!r} not found")


# ------------------------------------------------------------------------------ generation


async def _answer(
    request: Request, generate: ChatRequest | InferRequest, stream: bool, include_usage: bool
) -> Response:
    """Start the generation (a 4xx/5xx until it runs), then stream it or answer whole."""
    manager = _manager(request)
    chat = isinstance(generate, ChatRequest)
    request_id = str(_state(request).get("request_id", ""))
    _state(request)["model"] = generate.model or manager.settings.default_model
    if prompt_logging_enabled():
        prompt = generate.messages if isinstance(generate, ChatRequest) else generate.prompt
        logger.debug("prompt", prompt=str(prompt), model=generate.model)
    owner = manager.stream(generate, request_id=request_id)
    generation = await start_watched(request.receive, owner)
    completion = Completion(
        id=("chatcmpl-" if chat else "cmpl-") + request_id,
        created=int(time.time()),
        model=generation.model_id,
        chat=chat,
    )
    if stream:
        framing = ChatFraming if chat else CompletionFraming
        return GenerationResponse(owner, generation, framing(completion, include_usage))
    text = await collect_watched(request.receive, owner, generation)
    result = generation.result
    assert result is not None
    _state(request)["queue_ms"] = result.metrics.queue_ms
    if prompt_logging_enabled():
        logger.debug("completion", text=text)
    if result.done_reason not in FINISHED:
        return ended_early_response(result)
    return _json(completion.whole(text, result))


@openai_route
async def chat_completions(request: Request) -> Response:
    body = decode_json(await _body(request), ChatCompletionBody)
    max_name = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    _state(request)[PARAM_NAMES_KEY] = {
        "prompt": "messages",
        "format": "response_format",
        "max_tokens": max_name,
    }
    generate = chat_request(body, _manager(request).sampling_defaults)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, generate, bool(body.stream), include_usage)


@openai_route
async def completions(request: Request) -> Response:
    body = decode_json(await _body(request), CompletionBody)
    _state(request)[PARAM_NAMES_KEY] = {"format": "response_format"}
    generate = completion_request(body, _manager(request).sampling_defaults)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return await _answer(request, generate, bool(body.stream), include_usage)


# ------------------------------------------------------------------------------ embeddings


def _base64_floats(vector: list[float]) -> str:
    """Little-endian float32, base64: what the client decodes (and asks for by default)."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


@openai_route
async def embeddings(request: Request) -> Response:
    manager = _manager(request)
    body = decode_json(await _body(request), EmbeddingBody)
    inputs = embedding_inputs(body)
    _state(request)["model"] = body.model or manager.settings.default_model
    request_id = str(_state(request).get("request_id", ""))
    result = await manager.embed(body.model, inputs, request_id=request_id)
    width = len(result.embeddings[0])
    if body.dimensions is not None and body.dimensions != width:
        raise InvalidRequest(
            f"dimensions: this model's embeddings have {width} dimensions", field="dimensions"
        )
    encode = _base64_floats if body.encoding_format == "base64" else list
    data = [
        {"object": "embedding", "index": index, "embedding": encode(vector)}
        for index, vector in enumerate(result.embeddings)
    ]
    tokens = result.prompt_tokens
    return _json(
        {
            "object": "list",
            "data": data,
            "model": result.model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
    )


@openai_route
async def unknown_route(request: Request) -> Response:
    return Response(
        orjson.dumps(
            {
                "error": {
                    "message": f"no OpenAI endpoint {request.method} {request.url.path}",
                    "type": "not_found_error",
                    "param": None,
                    "code": "not_found",
                }
            }
        ),
        404,
        media_type="application/json",
    )


def build_openai_routes() -> list[Route]:
    return [
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/embeddings", embeddings, methods=["POST"]),
        Route("/v1/responses", create_response, methods=["POST"]),
        Route("/v1/{path:path}", unknown_route, methods=["GET", "POST", "DELETE", "PUT"]),
    ]
