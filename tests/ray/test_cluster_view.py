"""The cluster-wide /status and /metrics, built from real replicas' answers (no Ray)."""

from __future__ import annotations

from pathlib import Path

import anyio
import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

from modeld import ModelManager, Settings
from modeld.api.app import create_app
from modeld.ray.cluster import cluster_metrics, cluster_status
from modeld.ray.routing import ModelLoad, ReplicaView


async def _replica_answers(models_dir: Path, model: str) -> tuple[dict[str, object], str]:
    """A real app's /status and /metrics after one generation on ``model``."""
    settings = Settings(models_dir=models_dir, vram_budget_mb=64, vram_margin_mb=0, n_ctx=128)
    manager = ModelManager(settings)
    app = create_app(settings, manager)
    async with manager:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            body = {"model": model, "prompt": "hi", "max_tokens": 3, "stream": False}
            assert (await client.post("/infer", json=body)).status_code == 200
            status = (await client.get("/status")).json()
            metrics = (await client.get("/metrics")).text
    return status, metrics


def test_status_says_which_replica_holds_which_model(models_dir: Path) -> None:
    first, _ = anyio.run(_replica_answers, models_dir, "tiny-a.gguf")
    second, _ = anyio.run(_replica_answers, models_dir, "tiny-b.gguf")
    views = [ReplicaView("r1", at_unix=1.0, models={"tiny-a.gguf": ModelLoad("ready", 0)})]
    status = cluster_status({"r1": first, "r2": second, "r3": "TimeoutError"}, views)
    assert status["replicas_total"] == 3
    assert status["replicas_answering"] == 2
    assert status["models"] == {
        "tiny-a.gguf": [{"replica": "r1", "state": "ready", "queue_len": 0, "inflight": 0}],
        "tiny-b.gguf": [{"replica": "r2", "state": "ready", "queue_len": 0, "inflight": 0}],
    }
    assert status["budget_mb"] == 128
    replicas = status["replicas"]
    assert isinstance(replicas, list)
    assert [r["replica"] for r in replicas] == ["r1", "r2", "r3"]
    assert replicas[2] == {"replica": "r3", "error": "TimeoutError"}
    assert replicas[0]["instances"][0]["model_id"] == "tiny-a.gguf"
    router = status["router"]
    assert isinstance(router, list)
    assert router[0]["models"] == {"tiny-a.gguf": {"state": "ready", "waiting": 0}}
    orjson.dumps(status)  # it goes out as JSON


def test_metrics_label_every_sample_with_its_replica(models_dir: Path) -> None:
    _, first = anyio.run(_replica_answers, models_dir, "tiny-a.gguf")
    _, second = anyio.run(_replica_answers, models_dir, "tiny-b.gguf")
    text = cluster_metrics({"r1": first, "r2": second}, unreachable=["r3"]).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert text.count("# TYPE modeld_budget_mb ") == 1  # one family, however many replicas
    budgets = {s.labels["replica"]: s.value for s in families["modeld_budget_mb"].samples}
    assert budgets == {"r1": 64.0, "r2": 64.0}
    generations = [
        (s.labels["replica"], s.labels["model"], s.labels["done_reason"])
        for s in families["modeld_generations"].samples
        if s.name == "modeld_generations_total"
    ]
    assert sorted(generations) == [("r1", "tiny-a.gguf", "length"), ("r2", "tiny-b.gguf", "length")]
    replicas = {s.labels["state"]: s.value for s in families["modeld_cluster_replicas"].samples}
    assert replicas == {"answering": 2.0, "unreachable": 1.0}
    for family in families.values():
        for sample in family.samples:
            assert "replica" in sample.labels or family.name == "modeld_cluster_replicas"
