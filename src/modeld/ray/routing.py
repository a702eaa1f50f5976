"""Which model a request is for, and which replica should serve it.

Pure functions and values, no Ray. The ingress takes the key from the request
(:func:`routing_key`). A replica publishes :func:`routing_stats` (what its
``ModelManager`` holds, how busy each model is, how much budget is free); the router
turns each into a :class:`ReplicaView`, adds what it routed itself since that report
(:func:`with_local_routes`), and asks :func:`rank_replicas` for an order of preference.

The order: replicas that hold the model (least waiting first), unless every holder has
``spill_queue_len`` or more requests waiting for it and another replica has room for it
without waiting for busy work. Then the others: where it fits in free memory, before
where idle models would be evicted for it, before where it would wait; within each,
fewest busy models, fewest models, most free memory. Replicas that stopped accepting
come last, so that a request during a shutdown still gets a clear answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from urllib.parse import unquote

import msgspec

from modeld.api.ollama.names import model_id_for
from modeld.errors import ModeldError
from modeld.scheduling.manager import ManagerStatistics
from modeld.settings.config import Settings
from modeld.statistics import InstanceStatistics
from modeld.types import InstanceState

__all__ = [
    "TARGET_PREFIX",
    "LocalRoutes",
    "ModelLoad",
    "ReplicaView",
    "evictable",
    "model_size_mb",
    "rank_replicas",
    "routing_key",
    "routing_model_id",
    "routing_stats",
    "target_key",
    "view_from_stats",
    "with_local_routes",
]

TARGET_PREFIX = "#replica:"
"""A routing key that names a replica, not a model (a client's model id never becomes
one: :func:`routing_key` drops ids with this prefix)."""
_MODEL_IN_PATH = re.compile(r"^/(?:v1/)?models/(?P<model>[^/]+)(?:/|$)")
_HOLDING_STATES = frozenset({"loading", "ready", "routed"})
ROUTED = "routed"
"""State of a model the router sent to a replica after that replica's last report."""


@dataclass(frozen=True, slots=True)
class ModelLoad:
    state: str
    waiting: int  # queued + running
    est_mb: float = 0.0
    pinned: bool = False
    evictable: bool = False  # as the replica reported it (:func:`evictable`)

    @property
    def holding(self) -> bool:
        return self.state in _HOLDING_STATES


@dataclass(frozen=True, slots=True)
class ReplicaView:
    replica: str
    at_unix: float = 0.0
    pid: int = 0  # the replica's process, for operators
    accepting: bool = True
    free_mb: float = 0.0  # budget - margin - used
    models: Mapping[str, ModelLoad] = field(default_factory=dict)

    def idle_mb(self, except_model: str) -> float:
        """What idle, unpinned instances would give back if evicted."""
        return sum(
            load.est_mb
            for model, load in self.models.items()
            if model != except_model and load.evictable
        )

    def fit(self, model_id: str, size_mb: float) -> int:
        """0: fits in free memory; 1: fits once idle models are evicted; 2: must wait."""
        if self.free_mb >= size_mb:
            return 0
        return 1 if self.free_mb + self.idle_mb(model_id) >= size_mb else 2

    @property
    def busy_models(self) -> int:
        return sum(1 for load in self.models.values() if load.waiting > 0)


@dataclass(frozen=True, slots=True)
class LocalRoutes:
    """What this router sent to one model on one replica: when it sent each request it
    has not seen finish, and when it last sent one."""

    sent_unix: tuple[float, ...] = ()
    last_routed_unix: float = 0.0
    est_mb: float = 0.0  # the model's size as last reported by any replica

    def sent_since(self, at_unix: float) -> int:
        """In flight and sent after ``at_unix``: a report made then does not count them."""
        return sum(1 for sent in self.sent_unix if sent >= at_unix)


class _ModelField(msgspec.Struct):
    model: str | None = None


def routing_model_id(name: str, settings: Settings) -> str:
    """The model id a request's model name stands for, whatever protocol spelled it: an
    alias, ``<name>:latest``, the file's stem and the file id all route to one key (the
    id the replicas report). A name that stands for no id routes as it is (the replica
    answers it with the protocol's 404)."""
    try:
        return model_id_for(name, settings)
    except ModeldError:
        return name


def evictable(instance: InstanceStatistics) -> bool:
    """Whether the replica would evict this instance for another model: ready, nothing
    queued or running, not pinned (the pool's rule, from its statistics)."""
    return (
        instance.state is InstanceState.READY
        and instance.queue_len == 0
        and instance.inflight == 0
        and not instance.pinned
    )


def routing_key(
    path: str,
    body: bytes,
    default_model: str | None,
    resolve: Callable[[str], str] = str,
) -> str:
    """The model a request is for: the path's (``/models/{id}/…``, ``/v1/models/{id}``),
    else the JSON body's ``model``, else the default, as ``resolve`` names it (see
    :func:`routing_model_id`); "" when there is none.

    A body that is not JSON, or whose ``model`` is not a string, still routes (to any
    replica): the replica answers it with the same 400 as ``modeld serve``.
    """
    model: str | None = None
    if match := _MODEL_IN_PATH.match(path):
        model = unquote(match["model"])
    elif body.lstrip()[:1] == b"{":
        try:
            model = msgspec.json.decode(body, type=_ModelField).model
        except (msgspec.DecodeError, msgspec.ValidationError):
            model = None
    model = model or default_model or ""
    if not model or model.startswith(TARGET_PREFIX):
        return ""
    return resolve(model)


def target_key(replica: str) -> str:
    """The routing key that sends a request to this replica and no other."""
    return TARGET_PREFIX + replica


def routing_stats(
    replica: str, stats: ManagerStatistics, now_unix: float, pid: int = 0
) -> dict[str, object]:
    """The replica's report, small and JSON-able (Ray ships it through its controller)."""
    return {
        "replica": replica,
        "at_unix": now_unix,
        "pid": pid,
        "accepting": stats.accepting,
        "free_mb": round(stats.budget_mb - stats.margin_mb - stats.used_est_mb, 3),
        "models": {
            instance.model_id: {
                "state": str(instance.state),
                "waiting": instance.queue_len + instance.inflight,
                "est_mb": instance.est_vram_mb,
                "pinned": instance.pinned,
                "evictable": evictable(instance),
            }
            for instance in stats.instances
        },
    }


def view_from_stats(replica: str, stats: Mapping[str, object]) -> ReplicaView:
    """A report back into a view; an empty or foreign report is a replica with no models."""
    models = stats.get("models")
    loads: dict[str, ModelLoad] = {}
    if isinstance(models, Mapping):
        for model, raw in models.items():
            if isinstance(raw, Mapping):
                loads[str(model)] = ModelLoad(
                    state=str(raw.get("state", "")),
                    waiting=_int(raw.get("waiting")),
                    est_mb=_float(raw.get("est_mb")),
                    pinned=bool(raw.get("pinned", False)),
                    evictable=bool(raw.get("evictable", False)),
                )
    return ReplicaView(
        replica=replica,
        at_unix=_float(stats.get("at_unix")),
        pid=_int(stats.get("pid")),
        accepting=bool(stats.get("accepting", True)),
        free_mb=_float(stats.get("free_mb")),
        models=loads,
    )


def with_local_routes(view: ReplicaView, routes: Mapping[str, LocalRoutes]) -> ReplicaView:
    """The report plus what this router sent since it was made: such a request waits there
    too, and a model sent there counts as held. What the report already covers is not
    counted twice, so a route whose end was never seen stops mattering at the next report.
    """
    if not routes:
        return view
    models = dict(view.models)
    free_mb = view.free_mb
    for model, local in routes.items():
        unseen = local.sent_since(view.at_unix)
        reported = models.get(model)
        if reported is not None and reported.holding:
            models[model] = replace(
                reported,
                waiting=reported.waiting + unseen,
                evictable=reported.evictable and unseen == 0,
            )
        elif unseen > 0 or local.last_routed_unix >= view.at_unix:
            models[model] = ModelLoad(state=ROUTED, waiting=unseen, est_mb=local.est_mb)
            free_mb -= local.est_mb
    return replace(view, models=models, free_mb=free_mb)


def rank_replicas(
    model_id: str,
    views: Sequence[ReplicaView],
    *,
    spill_queue_len: int,
    rng: random.Random | None = None,
) -> list[list[str]]:
    """Replica ids in order of preference, one per rank (see the module docstring).

    Equal candidates are shuffled first, so that concurrent first requests for different
    models spread over the replicas instead of piling onto the first one.
    """
    shuffled = list(views)
    (rng or random).shuffle(shuffled)
    accepting = [v for v in shuffled if v.accepting]
    closing = [v for v in shuffled if not v.accepting]
    if not model_id:
        ordered = sorted(accepting, key=lambda v: sum(m.waiting for m in v.models.values()))
        return [[v.replica] for v in ordered + closing]

    size_mb = model_size_mb(model_id, views)
    holders = sorted(
        (v for v in accepting if _holds(v, model_id)), key=lambda v: v.models[model_id].waiting
    )
    others = sorted(
        (v for v in accepting if not _holds(v, model_id)),
        key=lambda v: (v.fit(model_id, size_mb), v.busy_models, len(v.models), -v.free_mb),
    )
    with_room = [v for v in others if v.fit(model_id, size_mb) < 2]
    saturated = bool(holders) and holders[0].models[model_id].waiting >= spill_queue_len
    if saturated and with_room:
        ordered = with_room + holders + [v for v in others if v not in with_room]
    else:
        ordered = holders + others
    return [[v.replica] for v in ordered + closing]


def model_size_mb(model_id: str, views: Sequence[ReplicaView]) -> float:
    """The model's footprint as any replica last reported it (0 when none has loaded it)."""
    return max((v.models[model_id].est_mb for v in views if model_id in v.models), default=0.0)


def _holds(view: ReplicaView, model_id: str) -> bool:
    load = view.models.get(model_id)
    return load is not None and load.holding


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _float(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
