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

from starlette.responses import Response

from modeld.api.bodies import decode_body
from modeld.api.edge import Edge
from modeld.api.ollama.errors import OLLAMA_ERRORS
from modeld.api.ollama.facts import ModelFacts, has_chat_template, iso_time
from modeld.api.ollama.framing import OllamaFraming
from modeld.api.ollama.names import model_id_for, naming
from modeld.api.ollama.wire import (
    ChatBody,
    GenerateBody,
    as_request,
    format_of,
    logprobs_of,
    messages_of,
    refuse_unsupported,
    sampling_fields,
)
from modeld.api.protocol import json_response
from modeld.api.streaming import StreamFraming
from modeld.api.tools import tool_fields
from modeld.errors import InvalidRequest
from modeld.scheduling.generation import Generation
from modeld.scheduling.manager import ModelManager
from modeld.settings.keep_alive import KeepAlive, keep_alive_seconds
from modeld.types import ChatRequest, GenerationResult, InferRequest

__all__ = ["OllamaChat", "OllamaGenerate", "load_or_unload"]


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
    edge: Edge,
    model_id: str,
    options: dict[str, Any] | None,
    response_format: str | dict[str, Any] | None,
    stream: bool,
    keep_alive: KeepAlive | None,
    truncate: bool,
) -> dict[str, object]:
    """What every generation request shares: the model's configured defaults under
    the mapped ``options``, the format, the stream flag, the keep-alive and Ollama's
    truncation of a prompt too long for the context."""
    fields: dict[str, object] = {**edge.defaults_for(model_id), **sampling_fields(options)}
    fields.update(model=model_id, stream=stream, format=format_of(response_format))
    fields["truncate"] = truncate
    if keep_alive is not None:
        fields["keep_alive"] = keep_alive
    return fields


class _OllamaCall:
    """One generate or chat: Ollama's NDJSON lines, or the same as one object."""

    def __init__(self, edge: Edge, request: InferRequest | ChatRequest, *, chat: bool) -> None:
        self.request = request
        self._framing = OllamaFraming(edge.context.model_name or "", edge.context, chat=chat)

    def framing(self, generation: Generation) -> StreamFraming:
        return self._framing

    def whole(self, generation: Generation, text: str, result: GenerationResult) -> object:
        return self._framing.whole(text, result)


def _loaded_line(name: str, reason: str, *, chat: bool) -> Response:
    line: dict[str, object] = {"model": name, "created_at": iso_time(time.time())}
    if chat:
        line["message"] = {"role": "assistant", "content": ""}
    else:
        line["response"] = ""
    return json_response({**line, "done": True, "done_reason": reason})


NamedBody = TypeVar("NamedBody", GenerateBody, ChatBody)


def _named_body(edge: Edge, raw_body: bytes, schema: type[NamedBody]) -> tuple[NamedBody, str]:
    """The decoded body and its model's id; the model as the client named it goes to
    the context (the error shape names it so) with the id (the access log's ``model``).
    Raises :class:`InvalidRequest` without a model."""
    body = decode_body(raw_body, schema)
    if not body.model:
        raise InvalidRequest("model is required", field="model")
    edge.context.model_name = body.model
    model_id = edge.context.model = model_id_for(body.model, edge.settings)
    return body, model_id


class OllamaGenerate:
    """``POST /api/generate``, sharing the listings' cache of GGUF facts (whether a
    model has a chat template of its own)."""

    errors = OLLAMA_ERRORS
    early_end_in_answer = False

    def __init__(self, facts: ModelFacts) -> None:
        self._facts = facts

    async def _templated(self, manager: ModelManager, name: str, model_id: str) -> bool:
        model = await naming(name, lambda: manager.registry.lookup(model_id))
        metadata = await self._facts.of_or_none(model)
        return has_chat_template(manager.settings, model_id, metadata)

    async def decode(self, edge: Edge, raw_body: bytes) -> _OllamaCall | Response:
        body, model_id = _named_body(edge, raw_body, GenerateBody)
        name = body.model
        refuse_unsupported(name, body)
        if not body.prompt:
            reason = await load_or_unload(edge.manager, name, model_id, body.keep_alive)
            return _loaded_line(name, reason, chat=False)
        fields = _request_fields(
            edge, model_id, body.options, body.format, body.stream, body.keep_alive, body.truncate
        )
        fields.update(logprobs_of(body))
        generate: InferRequest | ChatRequest
        if not body.raw and await self._templated(edge.manager, name, model_id):
            turns = [{"role": "system", "content": body.system}] if body.system else []
            turns.append({"role": "user", "content": body.prompt})
            generate = as_request({**fields, "messages": turns}, ChatRequest)
        else:
            generate = as_request({**fields, "prompt": body.prompt}, InferRequest)
        return _OllamaCall(edge, generate, chat=False)


class OllamaChat:
    """``POST /api/chat``."""

    errors = OLLAMA_ERRORS
    early_end_in_answer = False

    async def decode(self, edge: Edge, raw_body: bytes) -> _OllamaCall | Response:
        body, model_id = _named_body(edge, raw_body, ChatBody)
        messages = messages_of(body.model, body)
        if not messages:
            reason = await load_or_unload(edge.manager, body.model, model_id, body.keep_alive)
            return _loaded_line(body.model, reason, chat=True)
        fields = _request_fields(
            edge, model_id, body.options, body.format, body.stream, body.keep_alive, body.truncate
        )
        fields.update(tool_fields(body.tools, default_type=True), **logprobs_of(body))
        generate = as_request({**fields, "messages": messages}, ChatRequest)
        return _OllamaCall(edge, generate, chat=True)
