"""The Ray Serve request router for modeld replicas (``request_router_class``).

Ray calls :meth:`ResidentModelRouter.choose_replicas` with the request's
``multiplexed_model_id`` (the model the ingress read from the body). The ranking itself
is :func:`modeld.ray.routing.rank_replicas` over what each replica last reported through
``record_routing_stats`` plus what this router sent since. A key made by
:func:`modeld.ray.routing.target_key` names one replica instead: the ingress uses it to
ask every replica for its ``/status`` and ``/metrics`` and to deliver a cancel to all.

Ray pickles this module by value, so it keeps no state of its own (the ingress finds the
router through :mod:`modeld.ray.registry`). Ray's multiplex cache (``@serve.multiplexed``)
is not used at all, so nothing in Ray ever unloads a model: the replica's
``ModelManager`` alone decides (docs/scale-out.md).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from modeld.ray import registry
from modeld.ray.routing import (
    TARGET_PREFIX,
    LocalRoutes,
    ReplicaView,
    model_size_mb,
    rank_replicas,
    view_from_stats,
    with_local_routes,
)

__all__ = ["ResidentModelRouter"]

_FORGET_AFTER_S = 600.0


class ResidentModelRouter(RequestRouter):
    """Routes to the replica whose ModelManager holds the model; see the module docstring.

    Keyword arguments (``request_router_kwargs``): ``spill_queue_len`` (default 4).
    """

    def initialize_state(self, spill_queue_len: int = 4, **_: Any) -> None:
        self._spill_queue_len = max(1, int(spill_queue_len))
        # internal request id -> (replica, model, when it was sent)
        self._reserved: dict[str, tuple[str, str, float]] = {}
        self._routes: dict[tuple[str, str], LocalRoutes] = {}
        deployment = self._deployment_id
        registry.register_router(deployment.app_name, deployment.name, self)

    # ------------------------------------------------------------ Ray's interface

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        by_tag = {r.replica_id.unique_id: r for r in candidate_replicas}
        key = pending_request.metadata.multiplexed_model_id if pending_request else ""
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True
        if key.startswith(TARGET_PREFIX):
            # A replica that is gone gets the request to any replica, which refuses it
            # (404 replica_not_found): routing nowhere would leave it waiting forever.
            target = by_tag.get(key.removeprefix(TARGET_PREFIX))
            return [[target]] if target is not None else [list(candidate_replicas)]
        views = [self._view(r) for r in candidate_replicas]
        ranks = rank_replicas(key, views, spill_queue_len=self._spill_queue_len)
        ranked = [[by_tag[tag] for tag in rank if tag in by_tag] for rank in ranks]
        if pending_request is not None and key and ranked and ranked[0]:
            size_mb = model_size_mb(key, views)
            self._reserve(pending_request.metadata.internal_request_id, ranked[0][0], key, size_mb)
        return ranked

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._release(internal_request_id)

    # ------------------------------------------------------------ the ingress's view

    def views(self) -> list[ReplicaView]:
        """Every replica as this router sees it now (report plus its own routing)."""
        return [self._view(r) for r in list(self._replicas.values())]

    # ------------------------------------------------------------ bookkeeping

    def _view(self, replica: RunningReplica) -> ReplicaView:
        tag = replica.replica_id.unique_id
        view = view_from_stats(tag, replica.routing_stats or {})
        local = {model: routes for (r, model), routes in list(self._routes.items()) if r == tag}
        return with_local_routes(view, local)

    def _reserve(
        self, request_id: str, replica: RunningReplica, model: str, size_mb: float
    ) -> None:
        """Count the request against the replica it will most likely go to (the first
        rank, unless Ray finds it full), so that the next decision, before the replica's
        next report, already sees it."""
        self._release(request_id)
        now_unix = time.time()
        self._forget_older_than(now_unix - _FORGET_AFTER_S)
        key = (replica.replica_id.unique_id, model)
        self._reserved[request_id] = (*key, now_unix)
        before = self._routes.get(key, LocalRoutes())
        self._routes[key] = LocalRoutes((*before.sent_unix, now_unix), now_unix, size_mb)

    def _release(self, request_id: str) -> None:
        reserved = self._reserved.pop(request_id, None)
        if reserved is None:
            return
        replica, model, sent_unix = reserved
        before = self._routes.get((replica, model), LocalRoutes())
        sent = list(before.sent_unix)
        if sent_unix in sent:
            sent.remove(sent_unix)
        self._routes[(replica, model)] = replace(before, sent_unix=tuple(sent))

    def _forget_older_than(self, cutoff_unix: float) -> None:
        """Requests whose end was never seen (cancelled before Ray sent them) and routes of
        replicas long gone: replicas' reports have covered them long since."""
        for request_id, (_, _, sent_unix) in list(self._reserved.items()):
            if sent_unix < cutoff_unix:
                self._release(request_id)
        for key, routes in list(self._routes.items()):
            if not routes.sent_unix and routes.last_routed_unix < cutoff_unix:
                del self._routes[key]
