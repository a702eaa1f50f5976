"""``POST /api/generate`` and ``POST /api/chat``: thin translations onto
``ModelManager.stream()``, the same call as ``/infer`` and ``/v1/chat/completions``; the
answer streams as Ollama's NDJSON or comes as one object.

``/api/generate`` renders ``system`` and ``prompt`` through the model's chat template
(its own or the configured one) as one user turn, as Ollama does; with ``raw: true``, or
for a model without a template, the prompt goes as it is (``system`` then has no place,
as in Ollama's default template ``{{ .Prompt }}``). An empty prompt (or empty
``messages``) loads the model (``done_reason: "load"``), or with ``keep_alive: 0``
unloads it as soon as it is idle (``"unload"``): what Open WebUI's unload button sends.
"""

from __future__ import annotations

import time
from typing import Any, TypeVar

from loguru import logger
from starlette.requests import Request
from starlette.responses import Response

from modeld.api.bodies import decode_body, read_body
from modeld.api.ollama.facts import ModelFacts, has_chat_template, iso_time
from modeld.api.ollama.framing import OllamaFraming
from modeld.api.ollama.names import model_id_for, naming
from modeld.api.ollama.wire import (
    ChatBody,
    GenerateBody,
    as_request,
    early_end_error,
    format_of,
    json_response,
    messages_of,
    refuse_unsupported,
    sampling_fields,
)
from modeld.api.streaming import GenerationResponse, collect_watched, start_watched
from modeld.errors import InvalidRequest
from modeld.observability.logging import prompt_logging_enabled
from modeld.scheduling.manager import ModelManager
from modeld.settings.keep_alive import KeepAlive, keep_alive_seconds
from modeld.types import ChatRequest, InferRequest

__all__ = ["Generating", "load_or_unload"]


def _manager(request: Request) -> ModelManager:
    manager: ModelManager = request.app.state.manager
    return manager


async def load_or_unload(
    manager: ModelManager, name: str, model_id: str, keep_alive: KeepAlive | None
) -> str:
    """What an empty prompt (or empty ``messages``) does; returns the ``done_reason``."""
    await naming(name, lambda: manager.registry.lookup(model_id))
    if keep_alive is not None and keep_alive_seconds(keep_alive) == 0:
        await manager.expire(model_id)
        return "unload"
    await naming(name, lambda: manager.load(model_id, keep_alive=keep_alive))
    return "load"


def _request_fields(
    manager: ModelManager,
    model_id: str,
    options: dict[str, Any] | None,
    response_format: str | dict[str, Any] | None,
    stream: bool,
    keep_alive: KeepAlive | None,
) -> dict[str, object]:
    """What every generation request shares: the model's configured defaults under
    the mapped ``options``, the format, the stream flag and the keep-alive."""
    fields: dict[str, object] = {**manager.sampling_defaults(model_id), **sampling_fields(options)}
    fields.update(model=model_id, stream=stream, format=format_of(response_format))
    if keep_alive is not None:
        fields["keep_alive"] = keep_alive
    return fields


async def _answer(
    request: Request, name: str, generate: InferRequest | ChatRequest, *, chat: bool
) -> Response:
    """Start the generation (an error status until it runs), then stream it or answer
    with one object; an unstreamed answer that ends early is an error status."""
    manager = _manager(request)
    if prompt_logging_enabled():
        prompt = generate.messages if isinstance(generate, ChatRequest) else generate.prompt
        logger.debug("prompt", prompt=str(prompt), model=generate.model)
    owner = manager.stream(generate, request_id=str(request.scope["state"]["request_id"]))
    generation = await naming(name, lambda: start_watched(request.receive, owner))
    framing = OllamaFraming(name, chat=chat)
    if generate.stream:
        return GenerationResponse(owner, generation, framing)
    text = await collect_watched(request.receive, owner, generation)
    result = generation.result
    assert result is not None
    request.scope["state"]["queue_ms"] = result.metrics.queue_ms
    if prompt_logging_enabled():
        logger.debug("completion", text=text)
    error = early_end_error(result)
    if error is not None:
        raise error
    return json_response(framing.whole(text, result))


def _loaded_line(name: str, reason: str, *, chat: bool) -> Response:
    line: dict[str, object] = {"model": name, "created_at": iso_time(time.time())}
    if chat:
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    return json_response({**line, "done": True, "done_reason": reason})


NamedBody = TypeVar("NamedBody", GenerateBody, ChatBody)


async def _named_body(
    request: Request, schema: type[NamedBody]
) -> tuple[ModelManager, NamedBody, str, str]:
    """The manager, the decoded body, the model as the client named it and its id (also
    the access log's ``model``). Raises :class:`InvalidRequest` without a model."""
    manager = _manager(request)
    settings = manager.settings
    raw_body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    body = decode_body(raw_body, schema)
    if not body.model:
        raise InvalidRequest("model is required", field="model")
    model_id = request.scope["state"]["model"] = model_id_for(body.model, settings)
    return manager, body, body.model, model_id


class Generating:
    """The generation routes, sharing the listings' cache of GGUF facts (whether a model
    has a chat template of its own)."""

    def __init__(self, facts: ModelFacts) -> None:
        self._facts = facts

    async def _templated(self, manager: ModelManager, name: str, model_id: str) -> bool:
        model = await naming(name, lambda: manager.registry.lookup(model_id))
        metadata = await self._facts.of_or_none(model)
        return has_chat_template(manager.settings, model_id, metadata)

    async def generate(self, request: Request) -> Response:
        manager, body, name, model_id = await _named_body(request, GenerateBody)
        refuse_unsupported(name, body)
        if not body.prompt:
            reason = await load_or_unload(manager, name, model_id, body.keep_alive)
            return _loaded_line(name, reason, chat=False)
        fields = _request_fields(
            manager, model_id, body.options, body.format, body.stream, body.keep_alive
        )
        generate: InferRequest | ChatRequest
        if not body.raw and await self._templated(manager, name, model_id):
            turns = [{"role": "system", "content": body.system}] if body.system else []
            turns.append({"role": "user", "content": body.prompt})
            generate = as_request({**fields, "messages": turns}, ChatRequest)
        else:
            generate = as_request({**fields, "prompt": body.prompt}, InferRequest)
        return await _answer(request, name, generate, chat=False)

    async def chat(self, request: Request) -> Response:
        manager, body, name, model_id = await _named_body(request, ChatBody)
        messages = messages_of(name, body)
        if not messages:
            reason = await load_or_unload(manager, name, model_id, body.keep_alive)
            return _loaded_line(name, reason, chat=True)
        fields = _request_fields(
            manager, model_id, body.options, body.format, body.stream, body.keep_alive
        )
        generate = as_request({**fields, "messages": messages}, ChatRequest)
        return await _answer(request, name, generate, chat=True)
