"""The image built from the repo's Dockerfile, run as an operator would run it.

Hardened as in deploy/k8s/ (read-only root, no capabilities, no new privileges, a memory
limit), the models dir mounted read-only, the port published on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.deploy.container.conftest import GEMMA, ndjson, poll, skip_unless_enabled
from tests.deploy.podman import Container, Podman

skip_unless_enabled()
pytestmark = pytest.mark.timeout(2400)

GRACE_S = 2
UID = "10001"
LONG_STORY = {"prompt": "Tell a long story.", "max_tokens": 900, "temperature": 0.7, "seed": 7}
HARDENED = ("--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges")


def start_modeld(podman: Podman, image: str, models_dir: Path) -> tuple[Container, str]:
    container = podman.start(
        image,
        "--default-model", GEMMA, "--prewarm-default", "--threads", "2", "--n-ctx", "1024",
        "--vram-budget-mb", "1536", "--shutdown-grace", str(GRACE_S),
        options=[
            *HARDENED, "--memory", "2g", "-p", "127.0.0.1::8080",
            "-v", f"{models_dir}:/models:ro",
        ],
    )  # fmt: skip
    base_url = f"http://127.0.0.1:{container.host_port()}"
    with container.diagnostics():
        poll(lambda: httpx.get(f"{base_url}/readyz"), lambda r: r.status_code == 200)
    return container, base_url


@pytest.fixture(scope="module")
def running(
    podman: Podman, modeld_image: str, gemma_models_dir: Path
) -> Iterator[tuple[Container, httpx.Client]]:
    container, base_url = start_modeld(podman, modeld_image, gemma_models_dir)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        yield container, client


def test_probes_answer(running: tuple[Container, httpx.Client]) -> None:
    _, client = running
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert (ready.status_code, ready.json()) == (200, {"status": "ready"})


def test_models_come_from_the_read_only_mount(running: tuple[Container, httpx.Client]) -> None:
    container, client = running
    assert [model["id"] for model in client.get("/models").json()["models"]] == [GEMMA]
    for path in ("/models/new.gguf", "/opt/modeld/new"):
        touched = container.exec("touch", path, check=False)
        assert touched.returncode != 0
        assert "Read-only file system" in touched.stderr


def test_streamed_infer_on_gemma(running: tuple[Container, httpx.Client]) -> None:
    _, client = running
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}
    with client.stream("POST", "/infer", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/x-ndjson")
        lines = ndjson(list(response.iter_lines()))
    *chunks, terminal = lines
    assert len(chunks) >= 2, lines
    assert "France" in "".join(str(chunk["text"]) for chunk in chunks)
    assert not any(chunk.get("done") for chunk in chunks)
    assert terminal["done"] is True
    assert terminal["done_reason"] in {"length", "stop"}
    assert terminal["model"] == GEMMA
    metrics = terminal["metrics"]
    assert isinstance(metrics, dict)
    assert len(chunks) <= metrics["completion_tokens"] <= 16


def test_metrics_count_the_generation(running: tuple[Container, httpx.Client]) -> None:
    _, client = running
    client.post("/infer", json={"prompt": "Hi", "max_tokens": 4, "stream": False})
    metrics = client.get("/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    samples = dict(
        line.rsplit(" ", 1) for line in metrics.text.splitlines() if line[:1] not in ("#", "")
    )
    assert float(samples[f'modeld_tokens_generated_total{{model="{GEMMA}"}}']) >= 4
    assert float(samples["modeld_budget_mb"]) == 1536


def test_runs_as_the_unprivileged_user(
    running: tuple[Container, httpx.Client], podman: Podman, modeld_image: str
) -> None:
    container, _ = running
    status = container.pid1_status()
    assert status["Name"] == "modeld"  # PID 1 itself, so SIGTERM reaches it
    assert status["Uid"].split() == [UID] * 4
    assert status["Gid"].split() == [UID] * 4
    assert int(status["CapEff"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"
    configured = podman("image", "inspect", "--format", "{{.Config.User}}", modeld_image)
    assert configured.stdout.strip() == f"{UID}:{UID}"


def test_shared_libraries_all_resolve(running: tuple[Container, httpx.Client]) -> None:
    """Also those llama_cpp loads only on demand (libmtmd): none lacks a dependency.
    (The wheel's stray copies under site-packages/lib are never loaded.)"""
    container, _ = running
    packages = "/opt/modeld/lib/python3*/site-packages"
    listed = container.exec(
        "sh", "-c", f"find {packages}/llama_cpp {packages}/modeld -name '*.so*' -exec ldd {{}} +"
    ).stdout
    assert "libllama.so" in listed
    assert "libmtmd.so" in listed
    assert "libgomp.so.1 =>" in listed
    assert "not found" not in listed, listed


def test_health_check_turns_healthy(
    running: tuple[Container, httpx.Client], podman: Podman, modeld_image: str
) -> None:
    """podman runs health checks from systemd timers; without systemd, the test runs the
    image's own check command through ``podman healthcheck run``."""
    container, _ = running
    check = podman("image", "inspect", "--format", "{{json .HealthCheck}}", modeld_image)
    assert "/healthz" in json.loads(check.stdout)["Test"][-1]
    assert podman("healthcheck", "run", container.name, check=False).returncode == 0
    assert container.inspect("{{.State.Health.Status}}") == "healthy"


def test_podman_stop_ends_a_running_stream_with_shutdown(
    podman: Podman, modeld_image: str, gemma_models_dir: Path
) -> None:
    container, base_url = start_modeld(podman, modeld_image, gemma_models_dir)
    stop: dict[str, float | int] = {}

    def stop_container() -> None:
        started = time.monotonic()
        podman("stop", "--time", "30", container.name)
        stop["elapsed_s"] = time.monotonic() - started

    with (
        container.diagnostics(),
        httpx.Client(base_url=base_url, timeout=60) as client,
        client.stream("POST", "/infer", json=LONG_STORY) as response,
    ):
        lines = response.iter_lines()
        first = json.loads(next(lines))
        assert "text" in first
        stopper = threading.Thread(target=stop_container)
        stopper.start()
        rest = ndjson(list(lines))
        stopper.join(timeout=60)
    terminal = rest[-1]
    assert terminal["done"] is True
    assert terminal["done_reason"] == "shutdown"
    assert sum(1 for line in rest if line.get("done")) == 1
    assert container.inspect("{{.State.ExitCode}}") == "0"  # 137 had it needed a SIGKILL
    assert stop["elapsed_s"] < GRACE_S + 10
    log = container.logs()
    assert '"shutdown requested","signal":"SIGTERM"' in log
    assert "modeld stopped" in log
