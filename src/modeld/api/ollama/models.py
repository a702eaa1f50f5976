"""Ollama's model listings: ``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``,
and the model-management routes modeld does not offer (501)."""

from __future__ import annotations

import time
from collections.abc import Mapping

import anyio
from starlette.requests import Request
from starlette.responses import Response

from modeld.api.bodies import decode_body
from modeld.api.edge import Edge, manager_of
from modeld.api.ollama.facts import (
    CHAT_TEMPLATE_KEY,
    ModelFacts,
    details,
    has_chat_template,
    identity_digest,
    iso_time,
    modified_at,
)
from modeld.api.ollama.names import model_id_for, naming, ollama_name
from modeld.api.ollama.wire import OLLAMA_SAMPLING, ModelBody
from modeld.api.protocol import json_response
from modeld.chat.template import configured_source
from modeld.errors import ChatTemplateError, InvalidRequest, ModeldError, Unsupported
from modeld.gguf import GgufMetadata
from modeld.scheduling.manager import ModelManager
from modeld.settings.keep_alive import FOREVER_S
from modeld.sizes import MIB
from modeld.statistics import InstanceStatistics
from modeld.tools.formats import resolve_format
from modeld.types import InstanceState, context_sizes

__all__ = ["ModelListings", "unsupported", "version"]

# Keys whose values are shown elsewhere (``template``) or are too large to list.
_NOT_MODEL_INFO = ("tokenizer.chat_template",)


_manager = manager_of


async def version(request: Request) -> Response:
    """A plain ``X.Y.Z``: clients parse it as integers and compare it with a minimum."""
    return json_response({"version": _manager(request).settings.ollama_version})


async def unsupported(request: Request) -> Response:
    raise Unsupported(
        "modeld serves the GGUF files in its --models-dir: it does not pull, push, create, "
        "copy or delete models"
    )


class ModelListings:
    """The listing routes, sharing one cache of GGUF facts."""

    def __init__(self, facts: ModelFacts) -> None:
        self._facts = facts

    async def tags(self, request: Request) -> Response:
        """Every model file as ``<id>:latest``, then each of its configured aliases the
        same way (``gemma:latest``), as Ollama lists one model under each of its names:
        a client that checks a name against this list accepts every name modeld does."""
        manager = _manager(request)
        models = []
        for model in await manager.models():
            metadata = await self._facts.of_or_none(model)
            entry = {
                "modified_at": modified_at(model),
                "size": model.size_bytes,
                "digest": metadata.digest if metadata else identity_digest(model.identity),
                "details": details(metadata),
            }
            for alias in (model.id, *manager.settings.model(model.id).aliases):
                name = alias if ":" in alias else ollama_name(alias)
                models.append({"name": name, "model": name, **entry})
        return json_response({"models": models})

    async def ps(self, request: Request) -> Response:
        manager = _manager(request)
        stats = manager.statistics()
        on_gpu = stats.memory_probe == "nvml"
        models = []
        for instance in stats.instances:
            if instance.state is not InstanceState.READY:
                continue
            try:
                model = await manager.registry.lookup(instance.model_id)
            except ModeldError:
                continue  # its file is gone; the instance is on its way out
            metadata = await self._facts.of_or_none(model)
            size_bytes = round(instance.est_vram_mb * MIB)
            name = ollama_name(instance.model_id)
            models.append(
                {
                    "name": name,
                    "model": name,
                    "size": size_bytes,
                    "digest": metadata.digest if metadata else identity_digest(model.identity),
                    "details": details(metadata),
                    "expires_at": iso_time(_expires_at_unix(instance)),
                    "size_vram": size_bytes if on_gpu else 0,
                    "context_length": _context_length(manager, instance.model_id, metadata),
                }
            )
        return json_response({"models": models})

    async def show(self, request: Request) -> Response:
        edge = Edge.of(request)
        manager, settings = edge.manager, edge.settings
        body = decode_body(await edge.body(), ModelBody)
        name = body.model_name
        if not name:
            raise InvalidRequest("model is required", field="model")
        model_id = edge.context.model = model_id_for(name, settings)
        model = await naming(name, lambda: manager.registry.lookup(model_id))
        metadata = await self._facts.of(model)
        configured = settings.model(model_id).chat_template
        own = metadata.values.get(CHAT_TEMPLATE_KEY)
        template = configured or (own if isinstance(own, str) else "")
        capabilities = ["completion", "embedding"]
        shown: dict[str, object] = {}
        if has_chat_template(settings, model_id, metadata):
            capabilities += ["chat", "tools"]  # every template: "generic" needs none
            # what a chat renders with: a configured Jinja file's text (read as each
            # chat reads it), none for a llama.cpp built-in, else the file's own
            source = template if configured is None else await _configured_source(configured)
            if configured is not None and source is not None:
                template = source
            own_format = settings.model(model_id).tool_format
            shown["tool_format"] = resolve_format(source or None, own_format).value
        return json_response(
            {
                **shown,
                "modelfile": "",
                "parameters": _parameters(settings.model(model_id).defaults),
                "template": template,
                "details": details(metadata),
                "model_info": _model_info(metadata),
                "capabilities": capabilities,
                "modified_at": modified_at(model),
            }
        )


def _parameters(defaults: Mapping[str, object]) -> str:
    """The model's configured sampling defaults as Modelfile ``PARAMETER`` lines."""
    lines = []
    for field, value in defaults.items():
        values = value if isinstance(value, list | tuple) else [value]
        lines += [f"{OLLAMA_SAMPLING.wire(field)} {item}" for item in values]
    return "\n".join(lines)


def _expires_at_unix(instance: InstanceStatistics) -> float:
    """When it will be unloaded if nothing uses it: its expiry; while it is busy, the
    keep-alive from now (at least); far in the future when it is kept for ever."""
    if instance.expires_at_unix is not None:
        return instance.expires_at_unix
    if instance.keep_alive_seconds is not None and not instance.pinned:
        return time.time() + instance.keep_alive_seconds
    return time.time() + FOREVER_S


def _context_length(manager: ModelManager, model_id: str, metadata: GgufMetadata | None) -> int:
    """The instance's context: the model's own ``n_ctx`` setting, else ``--n-ctx``,
    within what it was trained for (as the loader sizes it)."""
    settings = manager.settings
    own = settings.model(model_id).n_ctx
    n_ctx = own if own is not None else settings.n_ctx
    trained = metadata.values.get(f"{metadata.architecture}.context_length") if metadata else None
    n_ctx_train = trained if isinstance(trained, int) and trained > 0 else None
    return context_sizes(n_ctx, settings.n_batch, n_ctx_train).n_ctx


def _model_info(metadata: GgufMetadata) -> dict[str, object]:
    info: dict[str, object] = {
        key: value for key, value in metadata.values.items() if not key.startswith(_NOT_MODEL_INFO)
    }
    info["general.parameter_count"] = metadata.parameter_count
    return info


async def _configured_source(chat_template: str) -> str | None:
    """The Jinja source a configured ``chat_template`` names (None for a built-in, or a
    file that cannot be read now: a chat would answer that error itself), read off the
    event loop."""
    try:
        return await anyio.to_thread.run_sync(configured_source, chat_template)
    except ChatTemplateError:
        return None
