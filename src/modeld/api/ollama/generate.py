"""``POST /api/generate``: a thin translation onto ``ModelManager.stream()``, the same
call as ``/infer``; the answer streams as Ollama's NDJSON or comes as one object.

An empty prompt loads the model (``done_reason: "load"``), or with ``keep_alive: 0``
unloads it as soon as it is idle (``"unload"``): what Open WebUI's unload button sends.
"""

from __future__ import annotations

import time

from starlette.requests import Request
from starlette.responses import Response

from modeld.api.bodies import decode_body, read_body
from modeld.api.ollama.facts import iso_time
from modeld.api.ollama.framing import OllamaFraming
from modeld.api.ollama.names import model_id_for, naming
from modeld.api.ollama.wire import (
    GenerateBody,
    as_request,
    early_end_error,
    json_response,
    refuse_unsupported,
    sampling_fields,
)
from modeld.api.streaming import GenerationResponse, collect_watched, start_watched
from modeld.errors import InvalidRequest
from modeld.keep_alive import keep_alive_seconds
from modeld.scheduling.manager import ModelManager
from modeld.types import InferRequest

__all__ = ["generate", "load_or_unload"]


async def load_or_unload(
    manager: ModelManager, name: str, model_id: str, keep_alive: str | float | None
) -> str:
    """What an empty prompt (or empty ``messages``) does; returns the ``done_reason``."""
    await naming(name, lambda: manager.registry.lookup(model_id))
    if keep_alive is not None and keep_alive_seconds(keep_alive) == 0:
        await manager.expire(model_id)
        return "unload"
    await naming(name, lambda: manager.load(model_id, keep_alive=keep_alive))
    return "load"


async def generate(request: Request) -> Response:
    manager: ModelManager = request.app.state.manager
    settings = manager.settings
    raw_body = await read_body(request, settings.max_body_bytes, settings.body_timeout)
    body = decode_body(raw_body, GenerateBody)
    if not body.model:
        raise InvalidRequest("model is required", field="model")
    name = body.model
    model_id = request.scope["state"]["model"] = model_id_for(name)
    refuse_unsupported(name, body)
    if not body.prompt:
        reason = await load_or_unload(manager, name, model_id, body.keep_alive)
        return json_response(
            {"model": name, "created_at": iso_time(time.time()), "response": "", "done": True,
             "done_reason": reason}
        )  # fmt: skip
    fields = sampling_fields(body.options)
    # No template here yet: the prompt goes as it is (Ollama's default template is
    # "{{ .Prompt }}", which leaves ``system`` out).
    fields.update(prompt=body.prompt, model=model_id, stream=body.stream)
    if body.keep_alive is not None:
        fields["keep_alive"] = body.keep_alive
    infer_request = as_request(fields, InferRequest)
    owner = manager.stream(infer_request, request_id=str(request.scope["state"]["request_id"]))
    generation = await naming(name, lambda: start_watched(request.receive, owner))
    framing = OllamaFraming(name, chat=False)
    if body.stream:
        return GenerationResponse(owner, generation, framing)
    text = await collect_watched(request.receive, owner, generation)
    result = generation.result
    assert result is not None
    request.scope["state"]["queue_ms"] = result.metrics.queue_ms
    error = early_end_error(result)
    if error is not None:
        raise error
    return json_response(framing.whole(text, result))
