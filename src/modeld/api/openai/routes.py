"""The OpenAI-compatible endpoints under ``/v1``: each translates the wire onto the same
``ModelManager`` calls as ``/infer`` (``stream``, ``embed``, ``models``) and back."""

from __future__ import annotations

import array
import base64
import sys
import time
from collections.abc import Sequence

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from modeld.api.bodies import decode_json
from modeld.api.edge import Edge, manager_of
from modeld.api.openai.errors import OPENAI_ERRORS
from modeld.api.openai.framing import ChatFraming, Completion, CompletionFraming
from modeld.api.openai.responses import RESPONSES
from modeld.api.openai.translate import (
    chat_request,
    completion_request,
    embedding_inputs,
    sampling_of,
)
from modeld.api.openai.wire import ChatCompletionBody, CompletionBody, EmbeddingBody
from modeld.api.protocol import ApiFamily, endpoint, json_response
from modeld.api.streaming import StreamFraming
from modeld.errors import InvalidRequest, ModelNotFound
from modeld.scheduling.generation import Generation
from modeld.scheduling.manager import ModelManager
from modeld.types import ChatRequest, GenerationResult, InferRequest

__all__ = ["CHAT", "COMPLETIONS", "OPENAI", "build_openai_routes"]

_json = json_response
_manager = manager_of


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


async def list_models(request: Request) -> Response:
    return _json({"object": "list", "data": await _model_objects(_manager(request))})


async def retrieve_model(request: Request) -> Response:
    name = request.path_params["model_id"]
    for model in await _model_objects(_manager(request)):
        if model["id"] == name:
            return _json(model)
    raise ModelNotFound(f"model {name!r} not found")


# ------------------------------------------------------------------------------ generation


class _CompletionCall:
    """One chat or text completion: SSE chunks, or one ``chat.completion`` object."""

    def __init__(
        self, edge: Edge, request: ChatRequest | InferRequest, include_usage: bool, choices: int
    ) -> None:
        self.request = request
        self.choices = choices
        self._context = edge.context
        self._include_usage = include_usage
        self._chat = isinstance(request, ChatRequest)
        self._created = int(time.time())

    def _completion(self, generation: Generation) -> Completion:
        prefix = "chatcmpl-" if self._chat else "cmpl-"
        return Completion(
            prefix + self._context.request_id, self._created, generation.model_id, self._chat
        )

    def framing(self, generation: Generation) -> StreamFraming:
        framing = ChatFraming if self._chat else CompletionFraming
        return framing(self._completion(generation), self._include_usage, self._context)

    def whole(self, generation: Generation, text: str, result: GenerationResult) -> object:
        return self._completion(generation).whole(text, result)

    def whole_choices(
        self, generation: Generation, answers: Sequence[tuple[str, GenerationResult]]
    ) -> object:
        return self._completion(generation).whole_choices(answers)


class ChatProtocol:
    """``POST /v1/chat/completions``."""

    errors = OPENAI_ERRORS
    early_end_in_answer = False

    async def decode(self, edge: Edge, body: bytes) -> _CompletionCall:
        decoded = decode_json(body, ChatCompletionBody)
        max_name = (
            "max_completion_tokens" if decoded.max_completion_tokens is not None else "max_tokens"
        )
        edge.context.param_names = {
            "prompt": "messages",
            "format": "response_format",
            "max_tokens": max_name,
            "logprobs": "top_logprobs",  # the count; chat's logprobs is the switch
        }
        generate = chat_request(decoded, sampling_of(body), edge.defaults_for)
        include_usage = bool(decoded.stream_options and decoded.stream_options.include_usage)
        return _CompletionCall(edge, generate, include_usage, decoded.n or 1)


class CompletionsProtocol:
    """``POST /v1/completions``."""

    errors = OPENAI_ERRORS
    early_end_in_answer = False

    async def decode(self, edge: Edge, body: bytes) -> _CompletionCall:
        decoded = decode_json(body, CompletionBody)
        edge.context.param_names = {"format": "response_format"}
        generate = completion_request(decoded, sampling_of(body), edge.defaults_for)
        include_usage = bool(decoded.stream_options and decoded.stream_options.include_usage)
        return _CompletionCall(edge, generate, include_usage, decoded.n or 1)


CHAT = ChatProtocol()
COMPLETIONS = CompletionsProtocol()


# ------------------------------------------------------------------------------ embeddings


def _base64_floats(vector: list[float]) -> str:
    """Little-endian float32, base64: what the client decodes (and asks for by default)."""
    packed = array.array("f", vector)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


async def embeddings(request: Request) -> Response:
    edge = Edge.of(request)
    body = decode_json(await edge.body(), EmbeddingBody)
    result = await edge.embed(body.model, embedding_inputs(body))
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


def build_openai_routes() -> list[BaseRoute]:
    """The routes below ``/v1`` (mounted there with OpenAI's error shape)."""
    return [
        Route("/models", list_models, methods=["GET"]),
        Route("/models/{model_id:path}", retrieve_model, methods=["GET"]),
        Route("/chat/completions", endpoint(CHAT), methods=["POST"]),
        Route("/completions", endpoint(COMPLETIONS), methods=["POST"]),
        Route("/embeddings", embeddings, methods=["POST"]),
        Route("/responses", endpoint(RESPONSES), methods=["POST"]),
        Route("/{path:path}", unknown_route, methods=["GET", "POST", "DELETE", "PUT"]),
    ]


OPENAI = ApiFamily("openai", "/v1", OPENAI_ERRORS, build_openai_routes)
