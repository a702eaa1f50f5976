"""The cluster-wide ``/status`` and ``/metrics`` the ingress answers, from per-replica ones.

Pure functions over what the replicas answered (their own ``/status`` JSON and
``/metrics`` text, unchanged from ``modeld serve``) and what the router believes
(:class:`~modeld.ray.routing.ReplicaView`): no Ray here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from modeld.ray.routing import ReplicaView

__all__ = ["ReplicaAnswer", "cluster_metrics", "cluster_status"]

_HOLDING = ("loading", "ready")


@dataclass(frozen=True, slots=True)
class ReplicaAnswer:
    """One replica's answer to a fanned-out request, or why there is none."""

    replica: str
    status: int = 0
    body: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and 200 <= self.status < 300


def cluster_status(
    statuses: Mapping[str, Mapping[str, object] | str], views: Sequence[ReplicaView]
) -> dict[str, object]:
    """Every replica's ``/status`` (or the error that stood in for it), which replica holds
    which model, and the totals; ``router`` is the routing view the ingress acts on."""
    replicas: list[dict[str, object]] = []
    models: dict[str, list[dict[str, object]]] = {}
    totals = {"budget_mb": 0.0, "used_est_mb": 0.0, "queue_len": 0, "inflight": 0}
    for replica, status in sorted(statuses.items()):
        if isinstance(status, str):
            replicas.append({"replica": replica, "error": status})
            continue
        replicas.append({"replica": replica, **status})
        totals["budget_mb"] += _number(status.get("budget_mb"))
        totals["used_est_mb"] += _number(status.get("used_est_mb"))
        for instance in _instances(status):
            queue_len, inflight = (
                int(_number(instance.get("queue_len"))),
                int(_number(instance.get("inflight"))),
            )
            totals["queue_len"] += queue_len
            totals["inflight"] += inflight
            if instance.get("state") in _HOLDING:
                models.setdefault(str(instance.get("model_id")), []).append(
                    {
                        "replica": replica,
                        "state": instance.get("state"),
                        "queue_len": queue_len,
                        "inflight": inflight,
                    }
                )
    return {
        "server_time_unix": time.time(),
        "replicas_total": len(statuses),
        "replicas_answering": sum(1 for s in statuses.values() if not isinstance(s, str)),
        **{name: round(value, 3) for name, value in totals.items()},
        "models": dict(sorted(models.items())),
        "replicas": replicas,
        "router": [
            {
                "replica": view.replica,
                "pid": view.pid,
                "reported_unix": view.at_unix,
                "accepting": view.accepting,
                "free_mb": view.free_mb,
                "models": {
                    model: {"state": load.state, "waiting": load.waiting}
                    for model, load in view.models.items()
                },
            }
            for view in views
        ],
    }


def cluster_metrics(texts: Mapping[str, str], unreachable: Iterable[str]) -> bytes:
    """Every replica's metric families, each sample labelled ``replica``, plus
    ``modeld_cluster_replicas{state}``; a family appears once however many replicas."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Relabelled(texts, list(unreachable)))
    return generate_latest(registry)


class _Relabelled(Collector):
    def __init__(self, texts: Mapping[str, str], unreachable: list[str]) -> None:
        self._texts = texts
        self._unreachable = unreachable

    def collect(self) -> Iterable[Metric]:
        replicas = GaugeMetricFamily(
            "modeld_cluster_replicas", "replicas by whether they answered", labels=["state"]
        )
        replicas.add_metric(["answering"], len(self._texts))
        replicas.add_metric(["unreachable"], len(self._unreachable))
        yield replicas
        merged: dict[str, Metric] = {}
        for replica, text in sorted(self._texts.items()):
            for family in text_string_to_metric_families(text):
                target = merged.setdefault(
                    family.name, Metric(family.name, family.documentation, family.type)
                )
                for sample in family.samples:
                    labels = {"replica": replica, **sample.labels}
                    target.add_sample(sample.name, labels, sample.value, sample.timestamp)
        yield from merged.values()


def _instances(status: Mapping[str, object]) -> list[Mapping[str, object]]:
    instances = status.get("instances")
    if not isinstance(instances, list):
        return []
    return [i for i in instances if isinstance(i, Mapping)]


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0
