"""The routing policy and the routing key: pure functions, no Ray needed."""

from __future__ import annotations

import random
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from modeld import ModelManager, Settings
from modeld.ray.routing import (
    ROUTED,
    TARGET_PREFIX,
    LocalRoutes,
    ModelLoad,
    ReplicaView,
    evictable,
    rank_replicas,
    routing_key,
    routing_model_id,
    routing_stats,
    target_key,
    view_from_stats,
    with_local_routes,
)
from modeld.settings.config import load_settings
from modeld.types import InstanceState


def _view(
    replica: str, free_mb: float = 100.0, accepting: bool = True, **models: ModelLoad
) -> ReplicaView:
    return ReplicaView(replica, at_unix=100.0, accepting=accepting, free_mb=free_mb, models=models)


def _ready(waiting: int = 0, est_mb: float = 50.0, pinned: bool = False) -> ModelLoad:
    """A ready model as a replica reports it (evictable: nothing waits, not pinned)."""
    return ModelLoad("ready", waiting, est_mb, pinned, evictable=waiting == 0 and not pinned)


def _order(model: str, views: list[ReplicaView], spill: int = 4, seed: int = 0) -> list[str]:
    ranks = rank_replicas(model, views, spill_queue_len=spill, rng=random.Random(seed))
    assert all(len(rank) == 1 for rank in ranks)
    return [rank[0] for rank in ranks]


# ----------------------------------------------------------------- routing_key


@pytest.mark.parametrize(
    ("path", "body", "default", "expected"),
    [
        ("/infer", b'{"model": "a.gguf", "prompt": "hi"}', None, "a.gguf"),
        ("/v1/chat/completions", b' {"messages": [], "model": "b.gguf"}', None, "b.gguf"),
        ("/api/generate", b'{"model": "c.gguf", "prompt": "{\\"model\\": 1}"}', None, "c.gguf"),
        ("/models/d.gguf/load", b"", None, "d.gguf"),
        ("/models/d%2Egguf/instance", b"", None, "d.gguf"),
        ("/v1/models/e.gguf", b"", None, "e.gguf"),
        ("/infer", b'{"prompt": "no model"}', "default.gguf", "default.gguf"),
        ("/infer", b'{"prompt": "no model"}', None, ""),
        ("/infer", b"not json", "default.gguf", "default.gguf"),
        ("/infer", b'{"model": 7}', None, ""),
        ("/infer", b'{"model": "a.gguf"', None, ""),
        ("/models", b"", None, ""),
    ],
)
def test_routing_key(path: str, body: bytes, default: str | None, expected: str) -> None:
    assert routing_key(path, body, default) == expected


def test_a_client_model_id_can_never_name_a_replica() -> None:
    body = b'{"model": "' + TARGET_PREFIX.encode() + b'abc"}'
    assert routing_key("/infer", body, None) == ""
    assert routing_key("/models/" + target_key("abc") + "/load", b"", None) == ""


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/infer", "gemma"),
        ("/v1/chat/completions", "gemma"),
        ("/api/chat", "gemma:latest"),
        ("/api/generate", "gemma-3-270m-q4_k_m"),
        ("/api/generate", "gemma-3-270m-q4_k_m:latest"),
        ("/infer", "gemma-3-270m-q4_k_m.gguf"),
        ("/api/show", "gemma-3-270m-q4_k_m.gguf:latest"),
    ],
)
def test_a_models_names_are_one_routing_key(tmp_path: Path, path: str, name: str) -> None:
    """An alias, ``:latest``, the stem and the file id reach the replica that holds it:
    the key is the id the replicas report."""
    config = tmp_path / "modeld.toml"
    config.write_text('[models."gemma-3-270m-q4_k_m.gguf"]\naliases = ["gemma"]\n')
    settings = load_settings({"models_dir": str(tmp_path)}, env={}, config_file=config)
    resolve = partial(routing_model_id, settings=settings)
    body = b'{"model": "' + name.encode() + b'"}'
    assert routing_key(path, body, None, resolve) == "gemma-3-270m-q4_k_m.gguf"


def test_a_name_that_stands_for_no_id_routes_as_it_is(tmp_path: Path) -> None:
    settings = load_settings({"models_dir": str(tmp_path)}, env={})
    assert routing_model_id("other:7b", settings) == "other:7b"  # the replica answers 404
    assert routing_model_id("../x", settings) == "../x"


# ----------------------------------------------------------------- evictable


def test_the_report_says_which_instances_could_be_evicted(tmp_path: Path) -> None:
    def instance(state: InstanceState, queued: int, running: int, pinned: bool) -> Any:
        return SimpleNamespace(state=state, queue_len=queued, inflight=running, pinned=pinned)

    assert evictable(instance(InstanceState.READY, 0, 0, False))
    assert not evictable(instance(InstanceState.READY, 1, 0, False))
    assert not evictable(instance(InstanceState.READY, 0, 1, False))
    assert not evictable(instance(InstanceState.READY, 0, 0, True))
    assert not evictable(instance(InstanceState.LOADING, 0, 0, False))
    view = view_from_stats("r1", {"models": {"a": {"state": "ready", "evictable": True}}})
    assert view.models["a"].evictable


# ----------------------------------------------------------------- rank_replicas


def test_the_replica_holding_the_model_comes_first() -> None:
    views = [_view("r1"), _view("r2", **{"m.gguf": _ready()}), _view("r3")]
    for seed in range(10):
        assert _order("m.gguf", views, seed=seed)[0] == "r2"


def test_among_holders_the_least_waiting_comes_first() -> None:
    views = [_view("r1", **{"m.gguf": _ready(waiting=3)}), _view("r2", **{"m.gguf": _ready(1)})]
    assert _order("m.gguf", views) == ["r2", "r1"]


def test_a_saturated_holder_spills_to_a_replica_with_room() -> None:
    hot = {"m.gguf": _ready(waiting=4, est_mb=50)}
    views = [_view("holder", free_mb=0, **hot), _view("spare", free_mb=60)]
    assert _order("m.gguf", views, spill=4) == ["spare", "holder"]
    assert _order("m.gguf", views, spill=5) == ["holder", "spare"]


def test_no_spill_where_the_model_would_only_wait_for_busy_work() -> None:
    hot = {"m.gguf": _ready(waiting=9, est_mb=50)}
    busy = {"other.gguf": _ready(waiting=1, est_mb=80)}
    views = [_view("holder", free_mb=0, **hot), _view("busy", free_mb=10, **busy)]
    assert _order("m.gguf", views, spill=2) == ["holder", "busy"]


def test_free_memory_before_evicting_idle_models_before_waiting() -> None:
    sized = {"m.gguf": _ready(est_mb=50)}  # tells the router the model's size
    views = [
        _view("waits", free_mb=0, **{"busy.gguf": _ready(waiting=2, est_mb=90)}),
        _view("evicts", free_mb=10, **{"idle.gguf": _ready(est_mb=60)}),
        _view("fits", free_mb=70, **{"x.gguf": _ready(est_mb=20)}),
        _view("holder-closing", accepting=False, **sized),
    ]
    assert _order("m.gguf", views) == ["fits", "evicts", "waits", "holder-closing"]


def test_a_pinned_idle_model_is_not_counted_as_room() -> None:
    sized = _view("sizer", accepting=False, **{"m.gguf": _ready(est_mb=50)})
    pinned = _view("pinned", free_mb=10, **{"p.gguf": _ready(est_mb=60, pinned=True)})
    idle = _view("idle", free_mb=0, **{"i.gguf": _ready(est_mb=60)})
    assert _order("m.gguf", [pinned, idle, sized])[:2] == ["idle", "pinned"]


def test_without_a_model_the_least_loaded_replica_comes_first() -> None:
    views = [_view("busy", **{"a.gguf": _ready(waiting=2)}), _view("quiet")]
    assert _order("", views) == ["quiet", "busy"]


def test_concurrent_first_requests_spread_over_the_replicas() -> None:
    """Before any report, what the router itself sent counts: four models, two replicas,
    two models each, whatever the tie-breaking."""
    for seed in range(20):
        rng = random.Random(seed)
        routes: dict[str, dict[str, LocalRoutes]] = {"r1": {}, "r2": {}}
        for model in ["a", "b", "c", "d"]:
            views = [with_local_routes(_view(r, free_mb=1000), routes[r]) for r in routes]
            first = rank_replicas(model, views, spill_queue_len=4, rng=rng)[0][0]
            routes[first][model] = LocalRoutes(sent_unix=(200.0,), last_routed_unix=200.0)
        assert sorted(len(models) for models in routes.values()) == [2, 2]


# ----------------------------------------------------------------- reports and local routes


def test_routed_since_the_report_counts_as_held_and_older_routes_do_not() -> None:
    view = _view("r1", **{"a.gguf": _ready(waiting=1)})  # reported at 100.0
    local = {
        # two sent after the report (waiting there too), one before (the report has it)
        "a.gguf": LocalRoutes(sent_unix=(50.0, 120.0, 130.0), last_routed_unix=130.0),
        "new.gguf": LocalRoutes(sent_unix=(), last_routed_unix=150.0, est_mb=40.0),
        "old.gguf": LocalRoutes(sent_unix=(), last_routed_unix=50.0),
        "lost.gguf": LocalRoutes(sent_unix=(10.0,), last_routed_unix=10.0),
    }
    merged = with_local_routes(view, local)
    assert merged.models["a.gguf"].waiting == 3
    assert merged.models["new.gguf"].state == ROUTED
    assert "lost.gguf" not in merged.models  # its end was never seen; the report says gone
    assert "old.gguf" not in merged.models
    assert merged.free_mb == view.free_mb - 40.0


def test_a_foreign_or_empty_report_is_a_replica_without_models() -> None:
    assert view_from_stats("r", {}).models == {}
    broken = view_from_stats("r", {"models": {"a": "nonsense", "b": {"waiting": "x"}}})
    assert list(broken.models) == ["b"]
    assert broken.models["b"].waiting == 0


def test_a_real_managers_report_round_trips(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, vram_budget_mb=64, vram_margin_mb=4, n_ctx=128)

    async def report() -> dict[str, object]:
        async with ModelManager(settings) as manager:
            await manager.load("tiny-a.gguf")
            return routing_stats("r1", manager.statistics(), now_unix=123.0, pid=4321)

    stats = anyio.run(report)
    view = view_from_stats("r1", stats)
    assert (view.at_unix, view.pid) == (123.0, 4321)
    assert view.accepting
    assert list(view.models) == ["tiny-a.gguf"]
    load = view.models["tiny-a.gguf"]
    assert (load.state, load.waiting, load.pinned) == ("ready", 0, False)
    assert load.est_mb > 0
    assert view.free_mb == pytest.approx(64 - 4 - load.est_mb, abs=0.01)
