"""One Ray Serve replica: a ``ModelManager`` behind modeld's own HTTP app, in-process.

The ingress forwards each HTTP request here whole (:class:`ForwardedRequest`); the app
answers exactly as ``modeld serve`` would, and every response gains an
``X-Modeld-Replica`` header. The replica reports what its manager holds through
``record_routing_stats`` (Ray polls it for the router) and leaves through ``__del__``,
which Ray calls once it has drained the replica's requests.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator

from ray import serve

from modeld.api.app import create_app
from modeld.api.context import RequestContext
from modeld.api.families import error_shape_for
from modeld.errors import ReplicaNotFound
from modeld.observability.logging import configure_logging
from modeld.ray.bridge import ForwardedRequest, Lifespan, ResponseStart, exchange
from modeld.ray.routing import TARGET_PREFIX, routing_stats, target_key
from modeld.scheduling.manager import ModelManager
from modeld.settings.config import Settings

__all__ = ["REPLICA_HEADER", "ModelReplica"]

REPLICA_HEADER = b"x-modeld-replica"


class ModelReplica:
    """Ray constructs it with ``await`` (an async ``__init__``) on the replica's loop."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        self.replica = str(serve.get_replica_context().replica_tag)
        configure_logging(settings.log_level)  # JSON lines on stderr: Ray keeps them per replica
        self._settings = settings
        self._manager = ModelManager(settings)
        self._app = create_app(settings, self._manager)
        self._lifespan = Lifespan(self._app)
        self._tag = ((REPLICA_HEADER, self.replica.encode()),)
        await self._lifespan.startup()

    async def handle_http(self, request: ForwardedRequest) -> AsyncIterator[ResponseStart | bytes]:
        """The response to one request: a :class:`ResponseStart`, then body pieces.

        Ray cancels this generator when the ingress's client leaves; that reaches the app
        as ``http.disconnect`` and modeld cancels the generation.
        """
        key = str(serve.get_multiplexed_model_id())
        if key.startswith(TARGET_PREFIX) and key != target_key(self.replica):
            message = f"replica {key.removeprefix(TARGET_PREFIX)!r} is not serving"
            request_id = dict(request.headers).get(b"x-request-id", b"").decode("latin-1")
            response = error_shape_for(request.path).response(
                ReplicaNotFound(message), RequestContext(request_id)
            )
            yield ResponseStart(response.status_code, (*response.raw_headers, *self._tag))
            yield bytes(response.body)
            return
        async for part in exchange(self._app, request, self._tag):
            yield part

    def record_routing_stats(self) -> dict[str, object]:
        return routing_stats(self.replica, self._manager.statistics(), time.time(), os.getpid())

    def check_health(self) -> None:
        """Unhealthy (Ray replaces the replica) when the manager's lifespan has ended or a
        load hangs past ``--load-timeout``: what ``/readyz`` reports on a single node."""
        if not self._lifespan.running:
            raise RuntimeError("the model manager has stopped")
        stalled = self._manager.stalled_loads()
        if stalled:
            raise RuntimeError(f"loads stalled past load_timeout: {', '.join(stalled)}")

    async def __del__(self) -> None:
        """Ray has already waited for this replica's requests (up to its graceful
        shutdown timeout): whatever still runs gets modeld's own shutdown, then every
        instance is closed."""
        await self._manager.shutdown(self._settings.shutdown_grace)
        await self._lifespan.shutdown()
