"""modeld's own endpoints (the root family): operations, and ``POST /infer``, the NDJSON
generation protocol. Each handler translates between the wire and ``ModelManager``;
nothing else lives here."""

from __future__ import annotations

from typing import Any

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from modeld.api.admin import reload_config
from modeld.api.bodies import decode_body, decode_with_defaults
from modeld.api.edge import Edge, manager_of
from modeld.api.errors import ErrorShape
from modeld.api.events import events, metrics
from modeld.api.protocol import ApiFamily, endpoint
from modeld.api.sampling import SamplingNames
from modeld.api.status_page import status_page
from modeld.api.streaming import NdjsonFraming, StreamFraming, terminal_record
from modeld.observability.audit import audited
from modeld.scheduling.generation import Generation
from modeld.types import GenerationResult, InferRequest

__all__ = ["INFER", "NATIVE", "build_routes"]


class LoadRequest(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pin: bool | None = None


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status, media_type="application/json")


_manager = manager_of


async def healthz(request: Request) -> Response:
    return _json({"status": "ok"})


async def readyz(request: Request) -> Response:
    manager = _manager(request)
    stalled = manager.stalled_loads()  # the watchdog: a load hung past --load-timeout
    ready = manager.accepting and not stalled and manager.is_ready(manager.settings.default_model)
    body: dict[str, object] = {"status": "ready" if ready else "not_ready"}
    if stalled:
        body["stalled_loads"] = stalled
    if not manager.accepting:
        body["reason"] = "shutting_down"
    return _json(body, 200 if ready else 503)


async def list_models(request: Request) -> Response:
    manager = _manager(request)
    models = [
        {
            "id": m.id,
            "name": m.name,
            "path": str(m.path),
            "size_bytes": m.size_bytes,
            "state": manager.state_of(m.id),
        }
        for m in await manager.models()
    ]
    return _json({"models": models})


async def status(request: Request) -> Response:
    stats = _manager(request).statistics()
    body = msgspec.to_builtins(stats)
    for instance in body["instances"]:
        instance["last_used"] = instance.pop("last_used_unix")
        instance["expires_at"] = instance.pop("expires_at_unix")
    return _json(body)


class _InferCall:
    """One ``POST /infer``: chunk lines and the terminal record, or the record with the
    whole text (an early end included: the record's ``done_reason`` says it)."""

    def __init__(self, request: InferRequest) -> None:
        self.request = request

    def framing(self, generation: Generation) -> StreamFraming:
        return NdjsonFraming()

    def whole(self, generation: Generation, text: str, result: GenerationResult) -> object:
        record = terminal_record(result)
        record["text"] = text
        return record


class InferProtocol:
    """NDJSON ``POST /infer``: the body *is* an :class:`InferRequest`."""

    errors = ErrorShape()
    early_end_in_answer = True
    sampling = SamplingNames("infer")

    async def decode(self, edge: Edge, body: bytes) -> _InferCall:
        return _InferCall(decode_with_defaults(body, InferRequest, edge.defaults_for))


INFER = InferProtocol()


async def cancel_request(request: Request) -> Response:
    target = request.path_params["request_id"]
    with audited("cancel", target, request.scope):
        _manager(request).cancel_request(target)
    return _json({"request_id": target, "cancelled": True})


async def load_model(request: Request) -> Response:
    manager = _manager(request)
    model_id = request.path_params["model_id"]
    with audited("load", model_id, request.scope) as record:
        body = await Edge.of(request).body()
        load_request = decode_body(body, LoadRequest) if body.strip() else LoadRequest()
        if load_request.pin is not None:  # a load that also pins or unpins
            record.action = "pin" if load_request.pin else "unpin"
        stats = await manager.load(model_id, pin=load_request.pin)
    instance = msgspec.to_builtins(stats)
    instance["last_used"] = instance.pop("last_used_unix")
    instance["expires_at"] = instance.pop("expires_at_unix")
    return _json(instance)


async def unload_model(request: Request) -> Response:
    model_id = request.path_params["model_id"]
    with audited("unload", model_id, request.scope):
        await _manager(request).unload(model_id)
    return _json({"model": model_id, "unloaded": True})


def build_routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/models", list_models, methods=["GET"]),
        Route("/status", status, methods=["GET"]),
        Route("/infer", endpoint(INFER), methods=["POST"]),
        Route("/requests/{request_id}", cancel_request, methods=["DELETE"]),
        Route("/models/{model_id}/load", load_model, methods=["POST"]),
        Route("/models/{model_id}/instance", unload_model, methods=["DELETE"]),
        Route("/events", events, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/", status_page, methods=["GET"]),
        Route("/admin/reload", reload_config, methods=["POST"]),
    ]


NATIVE = ApiFamily("modeld", "", INFER.errors, build_routes)
