"""modeld on a real local Ray cluster: two replicas, four models, budgets that fit two each.

Loopback only: ``ray.init(num_cpus=2)`` without the dashboard, Serve's proxy on
127.0.0.1 and a free port, everything shut down at the end of the module. Polls below
wait for another process (a replica's report, a stream's end) and are bounded.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modeld.errors import ConfigError
from modeld.gguf import read_gguf_header
from modeld.memory.estimate import estimate_footprint
from tests.support.poll import poll
from tests.support.server import free_port

from .conftest import FOUR_MODELS, LONG_CONTEXT

# Ray 2.60 on these machines: no usage reporting, the node on 127.0.0.1, no token auth.
for _name, _value in {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
}.items():
    os.environ.setdefault(_name, _value)

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
modeld_ray = pytest.importorskip("modeld.ray")

pytestmark = [pytest.mark.ray, pytest.mark.timeout(180)]
REPLICA = "x-modeld-replica"


@dataclass
class Cluster:
    base_url: str
    budget_mb: int

    def client(self, timeout_s: float = 60) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=timeout_s)

    def status(self) -> dict[str, Any]:
        with self.client() as client:
            return dict(client.get("/status").json())

    def holders(self, model: str) -> set[str]:
        return {h["replica"] for h in self.status()["models"].get(model, [])}

    def open_stream(self, body: dict[str, object], **headers: str) -> tuple[socket.socket, str]:
        """A raw ``POST /infer`` that has sent its first NDJSON line: (socket, replica)."""
        host, port = self.base_url.removeprefix("http://").split(":")
        payload = json.dumps(body).encode()
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock = socket.create_connection((host, int(port)), timeout=60)
        sock.sendall(
            f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"{extra}Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        received = b""
        while b"\r\n\r\n" not in received or b"\n{" not in received.split(b"\r\n\r\n", 1)[1]:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed early: {received!r}"
            received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].decode()
        assert head.startswith("HTTP/1.1 200"), head
        replica = next(
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith(REPLICA + ":")
        )
        return sock, replica


def _wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20) -> None:
    poll(condition, timeout_s=timeout_s, every_s=0.1, what=what)


def _budget_for_two(models_dir: Path) -> int:
    """MB in which two of the models fit and a third does not (estimate = measured on CPU)."""
    header = read_gguf_header(models_dir / FOUR_MODELS[0])
    estimate = estimate_footprint(
        header, n_ctx=LONG_CONTEXT, n_gpu_layers=0, n_batch=512, gpu=False
    )
    return int(estimate.total_bytes * 2.5 / 2**20) + 1


@pytest.fixture(scope="module")
def serve_port() -> Iterator[int]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(serve_port: int, long_model_dir: Path) -> Iterator[Cluster]:
    """Built the way ``serve run modeld.ray:app_builder k=v …`` builds it: from strings."""
    budget_mb = _budget_for_two(long_model_dir)
    app = modeld_ray.app_builder(
        {
            "models_dir": str(long_model_dir),
            "num_replicas": "2",
            "num_cpus_per_replica": "0.5",
            "vram_budget_mb": str(budget_mb),
            "vram_margin_mb": "0",
            "n_ctx": str(LONG_CONTEXT),
            "threads": "1",
            "max_queue_depth": "1",
            "max_wait_ms": "60000",
        }
    )
    serve.run(app, name="modeld", route_prefix="/")
    yield Cluster(f"http://127.0.0.1:{serve_port}", budget_mb)
    serve.delete("modeld")


def _stream(
    cluster: Cluster, model: str, max_tokens: int
) -> tuple[str | None, list[dict[str, Any]]]:
    body = {"model": model, "prompt": "hello", "max_tokens": max_tokens}
    with cluster.client() as client, client.stream("POST", "/infer", json=body) as response:
        assert response.status_code == 200, response.read()
        lines = [json.loads(line) for line in response.iter_lines() if line]
        return response.headers.get(REPLICA), lines


def test_concurrent_streams_end_normally_and_models_stay_with_their_replica(
    cluster: Cluster, record_property: Callable[[str, object], None]
) -> None:
    """Two streams per model over all four at once: every one ends with a normal terminal
    line (none evicted while running). Once the replicas have reported, a model is served
    again by the replica that holds it: the hit rate is measured, and must beat chance."""
    jobs = [model for model in FOUR_MODELS for _ in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda model: _stream(cluster, model, 200), jobs))
    for replica, lines in results:
        assert replica
        assert [line.get("done", False) for line in lines].count(True) == 1
        assert lines[-1]["done_reason"] == "length", lines[-1]
        assert lines[-1]["metrics"]["completion_tokens"] == 200

    def settled() -> bool:
        status = cluster.status()
        reported = {m for view in status["router"] for m in view["models"]}
        return status["replicas_answering"] == 2 and set(status["models"]) <= reported

    _wait_until(settled, "the replicas' reports to reach the router")
    hits = total = 0
    with cluster.client() as client:
        for _ in range(3):
            for model in FOUR_MODELS:
                holders = cluster.holders(model)
                body = {"model": model, "prompt": "hi", "max_tokens": 4, "stream": False}
                response = client.post("/infer", json=body)
                assert response.status_code == 200, response.text
                assert response.json()["done_reason"] == "length"
                total += 1
                hits += response.headers[REPLICA] in holders
    record_property("affinity_hit_rate", hits / total)
    print(f"affinity hit rate: {hits}/{total}")
    assert hits / total >= 0.75


def test_backpressure_passes_through_and_a_client_leaving_cancels_on_the_replica(
    cluster: Cluster,
) -> None:
    model = FOUR_MODELS[0]
    long_body = {"model": model, "prompt": "hello", "max_tokens": LONG_CONTEXT - 64}
    running, replica = cluster.open_stream(long_body)
    queued_body = json.dumps(long_body).encode()
    host, port = cluster.base_url.removeprefix("http://").split(":")
    queued = socket.create_connection((host, int(port)), timeout=60)
    try:
        queued.sendall(
            f"POST /infer HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(queued_body)}\r\n\r\n".encode()
            + queued_body
        )

        def queued_on_replica() -> bool:
            status = cluster.status()
            return any(h["queue_len"] == 1 for h in status["models"].get(model, []))

        _wait_until(queued_on_replica, "the second stream to queue behind the first")

        def only_this_replica_holds_it() -> bool:
            """As the router sees it: a report made before an earlier test's route or
            unload can rank the other replica first, and then it serves the request."""
            views = cluster.status()["router"]
            return all(v["replica"] == replica or model not in v["models"] for v in views)

        _wait_until(only_this_replica_holds_it, "the router to see the model on one replica")
        with cluster.client() as client:
            refused = client.post("/infer", json={**long_body, "max_tokens": 4})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "queue_full"
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers[REPLICA] == replica
    finally:
        queued.close()
        running.close()

    def cancelled_count() -> float:
        with cluster.client() as client:
            text = client.get("/metrics").text
        for family in text_string_to_metric_families(text):
            if family.name == "modeld_generations":
                return sum(
                    s.value
                    for s in family.samples
                    if s.name == "modeld_generations_total"
                    and s.labels == {"replica": replica, "model": model, "done_reason": "cancelled"}
                )
        return 0.0

    _wait_until(lambda: cancelled_count() >= 1, "the replica to cancel the running stream")

    def idle() -> bool:
        return all(h["inflight"] == 0 for h in cluster.status()["models"].get(model, []))

    _wait_until(idle, "the replica to have nothing in flight for the model")


def test_a_cancel_by_request_id_reaches_the_replica_running_it(cluster: Cluster) -> None:
    body = {"model": FOUR_MODELS[1], "prompt": "hello", "max_tokens": LONG_CONTEXT - 64}
    sock, _ = cluster.open_stream(body, **{"X-Request-ID": "ray-cancel-me"})
    try:
        with cluster.client() as client:
            cancelled = client.delete("/requests/ray-cancel-me")
            assert cancelled.status_code == 200, cancelled.text
            assert client.delete("/requests/no-such-request").status_code == 404
        received = b""
        while b'"done":true' not in received:
            chunk = sock.recv(65536)
            assert chunk, "the stream ended without its terminal line"
            received += chunk
    finally:
        sock.close()
    terminal = next(
        json.loads(line)
        for line in received.split(b"\n")
        if line.startswith(b"{") and b'"done":true' in line
    )
    assert terminal["done_reason"] == "cancelled"
    assert terminal["request_id"] == "ray-cancel-me"


def test_server_sent_events_stream_through_from_the_named_replica(cluster: Cluster) -> None:
    status = cluster.status()
    replica = status["replicas"][0]["replica"]
    loaded = {i["model_id"] for i in status["replicas"][0]["instances"]}
    model = next(m for m in FOUR_MODELS if m not in loaded)
    with (
        cluster.client() as client,
        client.stream("GET", "/events", headers={REPLICA: replica}) as events,
    ):
        assert events.headers["content-type"].startswith("text/event-stream")
        assert events.headers[REPLICA] == replica
        lines = events.iter_lines()
        assert next(lines) == ": connected"
        with cluster.client() as other:
            loading = other.post(f"/models/{model}/load", headers={REPLICA: replica})
        assert loading.status_code == 200, loading.text
        assert loading.headers[REPLICA] == replica
        # The load answered after the model was ready, so its event is already on the way:
        # a handful of lines (load started, progress, ready) must contain it.
        event = ""
        for _, line in zip(range(50), lines, strict=False):
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data:") and event == "model_ready":
                assert json.loads(line.removeprefix("data:"))["model"] == model
                break
        else:
            pytest.fail("no model_ready event came through")


def test_the_cluster_view_shows_every_replica(cluster: Cluster) -> None:
    with cluster.client() as client:
        warm = {"model": FOUR_MODELS[2], "prompt": "hi", "max_tokens": 2, "stream": False}
        assert client.post("/infer", json=warm).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = client.get("/readyz")
        metrics = client.get("/metrics")
        one = client.get("/status", headers={REPLICA: ready.json()["replicas"].popitem()[0]})
    status = cluster.status()
    assert ready.status_code == 200, ready.text
    assert status["replicas_total"] == status["replicas_answering"] == 2
    assert status["budget_mb"] == 2 * cluster.budget_mb
    assert FOUR_MODELS[2] in status["models"]
    for replica in status["replicas"]:
        assert replica["budget_mb"] == cluster.budget_mb
        assert "instances" in replica
        assert replica["accepting"] is True
    assert one.status_code == 200
    assert one.headers[REPLICA] in {r["replica"] for r in status["replicas"]}
    assert "instances" in one.json()  # one replica's own /status, unchanged
    families = {f.name: f for f in text_string_to_metric_families(metrics.text)}
    budgets = {s.labels["replica"]: s.value for s in families["modeld_budget_mb"].samples}
    assert budgets == {r["replica"]: float(cluster.budget_mb) for r in status["replicas"]}
    queue_samples = families["modeld_queue_len"].samples
    assert {s.labels["replica"] for s in queue_samples} <= set(budgets)


def test_bad_requests_get_the_same_answers_as_a_single_node(cluster: Cluster) -> None:
    with cluster.client() as client:
        unknown_field = client.post("/infer", json={"prompt": "hi", "colour": "red"})
        assert unknown_field.status_code == 400
        assert unknown_field.json()["error"]["field"] == "colour"
        assert REPLICA in unknown_field.headers  # answered by a replica, as modeld would
        assert len(unknown_field.headers.get_list("x-request-id")) == 1
        unknown = client.post("/infer", json={"model": "nope.gguf", "prompt": "hi"})
        assert unknown.status_code == 404
        assert unknown.json()["error"]["code"] == "model_not_found"
        not_json = client.post("/infer", content=b"{nope")
        assert not_json.status_code == 400
        spoofed = client.post("/infer", json={"model": "#replica:x", "prompt": "hi"})
        assert spoofed.status_code in {400, 404}
        assert spoofed.json()["error"]["code"] in {"invalid_model_id", "model_not_found"}
        too_big = client.post("/infer", content=b"{" + b" " * (1 << 20) + b"}")
        assert too_big.status_code == 413
        assert too_big.json()["error"]["code"] == "payload_too_large"
        gone = client.get("/status", headers={REPLICA: "no-such-replica"})
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "replica_not_found"
        foreign = client.get("/status", headers={"Host": "evil.example"})
        assert foreign.status_code == 403
        assert foreign.json()["error"]["code"] == "forbidden_host"


def test_builder_arguments_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match="num_replicas") as bad_ray_option:
        modeld_ray.parse_args({"num_replicas": "two"})
    assert bad_ray_option.value.field == "num_replicas"
    with pytest.raises(ConfigError, match="vram_budget_mb"):
        modeld_ray.parse_args({"vram_budget_mb": "lots"})
    with pytest.raises(ConfigError, match="'colour'") as unknown:
        modeld_ray.parse_args({"colour": "red"})
    assert unknown.value.field == "colour"
    settings, options = modeld_ray.parse_args({"n_ctx": "512", "spill_queue_len": "2"})
    assert (settings.n_ctx, options.spill_queue_len, options.num_replicas) == (512, 2, 1)


def test_deleting_the_application_drains_running_streams(
    serve_port: int, long_model_dir: Path, tmp_path: Path
) -> None:
    """Its own application (one replica, under a route prefix): a stream running when the
    application is deleted still ends with its full length and its terminal line, and the
    deletion returns only after it."""
    directory = tmp_path / "one"
    directory.mkdir()
    (directory / FOUR_MODELS[3]).write_bytes((long_model_dir / FOUR_MODELS[3]).read_bytes())
    app = modeld_ray.build_app(
        modeld_ray.parse_args(
            {"models_dir": str(directory), "n_ctx": str(LONG_CONTEXT), "threads": "1"}
        )[0],
        modeld_ray.RayOptions(num_replicas=1, num_cpus_per_replica=0.5),
    )
    serve.run(app, name="drain", route_prefix="/drain")
    base = f"http://127.0.0.1:{serve_port}/drain"
    max_tokens = 1500
    ended: dict[str, Any] = {}
    first_line = threading.Event()

    def stream() -> None:
        body = {"model": FOUR_MODELS[3], "prompt": "hello", "max_tokens": max_tokens}
        with (
            httpx.Client(base_url=base, timeout=120) as client,
            client.stream("POST", "/infer", json=body) as response,
        ):
            lines = []
            for line in response.iter_lines():
                if line:
                    lines.append(json.loads(line))
                    first_line.set()
            ended["at"] = time.monotonic()
            ended["last"] = lines[-1]

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_line.wait(60), "the stream did not start"
    serve.delete("drain")
    deleted_at = time.monotonic()
    reader.join(60)
    assert ended["last"]["done"] is True
    assert ended["last"]["done_reason"] == "length"
    assert ended["last"]["metrics"]["completion_tokens"] == max_tokens
    assert ended["at"] <= deleted_at
    assert httpx.post(base + "/infer", json={"prompt": "hi"}, timeout=10).status_code == 404


@dataclass(frozen=True)
class DyingStream:
    """A stream in one protocol and how its last line reads."""

    path: str
    body: dict[str, Any]
    end_marker: bytes  # in the last line only

    def last_line(self, received: bytes) -> dict[str, Any]:
        lines = [line for line in received.split(b"\n") if line.startswith(b"{")]
        last: dict[str, Any] = json.loads(next(ln for ln in lines if self.end_marker in ln))
        return last


_DYING = {
    "infer": DyingStream(
        "/infer",
        {"model": FOUR_MODELS[2], "prompt": "hello", "max_tokens": LONG_CONTEXT - 64},
        b'"done":true',
    ),
    "ollama": DyingStream(
        "/api/generate",
        {
            "model": FOUR_MODELS[2].removesuffix(".gguf") + ":latest",
            "prompt": "hello",
            "options": {"num_predict": LONG_CONTEXT - 64},
        },
        b'{"error":',
    ),
}


@pytest.mark.parametrize("protocol", list(_DYING))
def test_a_replica_dying_mid_stream_ends_the_stream_with_an_error_line(
    serve_port: int, long_model_dir: Path, tmp_path: Path, protocol: str
) -> None:
    """The abrupt end a native abort in llama.cpp would cause: the replica's process is
    killed while it streams. The client still gets a last line saying so, in the
    stream's own protocol (an Ollama client understands only Ollama's error line)."""
    dying = _DYING[protocol]
    directory = tmp_path / "one"
    directory.mkdir()
    (directory / FOUR_MODELS[2]).write_bytes((long_model_dir / FOUR_MODELS[2]).read_bytes())
    settings, _ = modeld_ray.parse_args(
        {"models_dir": str(directory), "n_ctx": str(LONG_CONTEXT), "threads": "1"}
    )
    options = modeld_ray.RayOptions(num_replicas=1, num_cpus_per_replica=0.5)
    serve.run(modeld_ray.build_app(settings, options), name="crash", route_prefix="/crash")
    try:
        crash = Cluster(f"http://127.0.0.1:{serve_port}/crash", 0)
        with crash.client() as client:  # the router has heard from the replica
            _wait_until(lambda: client.get("/status").json()["router"][0]["pid"] > 0, "a report")
            pid = client.get("/status").json()["router"][0]["pid"]
        host, port = crash.base_url.removeprefix("http://").split("/")[0].split(":")
        payload = json.dumps(dying.body).encode()
        with socket.create_connection((host, int(port)), timeout=60) as sock:
            sock.sendall(
                f"POST /crash{dying.path} HTTP/1.1\r\nHost: {host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            received = sock.recv(65536)
            assert received.startswith(b"HTTP/1.1 200"), received
            os.kill(pid, signal.SIGKILL)  # this test's own replica, found by its report
            while dying.end_marker not in received:
                chunk = sock.recv(65536)
                assert chunk, "the stream ended without a last line saying why"
                received += chunk
        last = dying.last_line(received)
        if protocol == "infer":
            assert last["done_reason"] == "error"
            assert last["error"]["code"] == "replica_lost"
            assert last["model"] == FOUR_MODELS[2]
        else:
            assert set(last) == {"error"}  # Ollama's error line, which its client raises
            assert isinstance(last["error"], str)
            assert last["error"]
    finally:
        serve.delete("crash")
