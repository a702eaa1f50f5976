"""deploy/k8s/ rendered with ``kubectl kustomize`` and validated offline against the
Kubernetes API schemas (``kubernetes-validate --strict``), then held to what modeld needs:
the probes, the grace period, the config and the image it runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from modeld.settings.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
VARIANTS = ["cpu", "gpu"]  # overlays of deploy/k8s/base
# The oldest and the newest API the manifests are checked against.
KUBERNETES_VERSIONS = ["1.30.0", "1.37.0"]
# Hypercorn's own graceful timeout is shutdown_grace + 2 s; closing the models follows.
CLOSE_MARGIN_S = 5

Manifest = dict[str, Any]


def _tool(name: str, install_hint: str) -> str:
    """The tool's path, next to this interpreter first (a venv's console script)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:  # a missing validator must fail the suite, never skip it
        pytest.fail(f"{name} is not installed: {install_hint}")
    return found


def render(variant: str) -> str:
    kubectl = _tool("kubectl", "it ships with the machine image (kubectl kustomize)")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / variant)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    validator = _tool("kubernetes-validate", "pip install -e '.[test]'")
    return subprocess.run(
        [validator, "--strict", "--quiet", "-k", version, str(path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module", params=VARIANTS)
def rendered(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("k8s") / f"{request.param}.yaml"
    path.write_text(render(request.param))
    return path


def manifests(path: Path) -> dict[str, Manifest]:
    return {doc["kind"]: doc for doc in yaml.safe_load_all(path.read_text()) if doc}


def container_of(deployment: Manifest) -> Manifest:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return dict(container)


def settings_of(config_map: Manifest, tmp_path: Path) -> Settings:
    """The ConfigMap's TOML through modeld's own loader: unknown keys or bad values fail."""
    (toml_text,) = config_map["data"].values()
    config_file = tmp_path / "modeld.toml"
    config_file.write_text(toml_text)
    return load_settings(env={}, config_file=config_file)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_validate_strictly(rendered: Path, version: str) -> None:
    result = validate(rendered, version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(manifests(rendered)) == {
        "ConfigMap", "Deployment", "PersistentVolumeClaim", "Service",
    }  # fmt: skip


def test_the_validator_rejects_an_unknown_field(rendered: Path, tmp_path: Path) -> None:
    """The control: the same check fails on a misspelt probe field."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(rendered.read_text().replace("periodSeconds:", "periodSecs:", 1))
    result = validate(broken, KUBERNETES_VERSIONS[-1])
    assert result.returncode == 1
    assert "'periodSecs' was unexpected" in result.stdout + result.stderr


def test_one_replica_recreated_with_probes(rendered: Path) -> None:
    deployment = manifests(rendered)["Deployment"]
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    container = container_of(deployment)
    probes = {kind: container[kind]["httpGet"]["path"] for kind in (
        "livenessProbe", "readinessProbe", "startupProbe")}  # fmt: skip
    assert probes == {
        "livenessProbe": "/healthz", "readinessProbe": "/readyz", "startupProbe": "/healthz",
    }  # fmt: skip


def test_probes_and_grace_fit_the_config(rendered: Path, tmp_path: Path) -> None:
    objects = manifests(rendered)
    settings = settings_of(objects["ConfigMap"], tmp_path)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = container_of(objects["Deployment"])
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > settings.load_timeout
    assert pod["terminationGracePeriodSeconds"] > settings.shutdown_grace + CLOSE_MARGIN_S
    # Readiness follows the default model: it must exist and be loaded before serving.
    assert settings.default_model
    assert settings.prewarm_default
    (port,) = container["ports"]
    assert port["containerPort"] == settings.port == 8080
    env = {item["name"]: item["value"] for item in container["env"]}
    config_mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    assert env["MODELD_CONFIG"] == f"{config_mount['mountPath']}/modeld.toml"
    assert env["MODELD_HOST"] == "0.0.0.0"


def test_models_volume_is_read_only(rendered: Path, tmp_path: Path) -> None:
    objects = manifests(rendered)
    settings = settings_of(objects["ConfigMap"], tmp_path)
    container = container_of(objects["Deployment"])
    mount = next(m for m in container["volumeMounts"] if m["name"] == "models")
    assert mount["readOnly"] is True
    assert Path(mount["mountPath"]) == settings.models_path
    volumes = {v["name"]: v for v in objects["Deployment"]["spec"]["template"]["spec"]["volumes"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    assert claim == {"claimName": objects["PersistentVolumeClaim"]["metadata"]["name"],
                     "readOnly": True}  # fmt: skip
    config_volume = volumes["config"]["configMap"]["name"]
    assert config_volume == objects["ConfigMap"]["metadata"]["name"]  # the hashed name


def test_runs_as_the_images_user_without_privileges(rendered: Path) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    (image_user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, flags=re.MULTILINE)
    pod = manifests(rendered)["Deployment"]["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) \
        == image_user  # fmt: skip
    assert pod["automountServiceAccountToken"] is False
    container = container_of(manifests(rendered)["Deployment"])
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,  # tests/deploy/container runs the image --read-only
        "capabilities": {"drop": ["ALL"]},
    }


def test_prometheus_scrapes_the_metrics_port(rendered: Path) -> None:
    objects = manifests(rendered)
    annotations = objects["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    (port,) = container_of(objects["Deployment"])["ports"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(port["containerPort"]),
        "prometheus.io/path": "/metrics",
    }
    service = objects["Service"]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]
    assert service["spec"]["selector"] == objects["Deployment"]["spec"]["selector"]["matchLabels"]


def test_memory_limit_holds_the_budget(rendered: Path, tmp_path: Path) -> None:
    objects = manifests(rendered)
    settings = settings_of(objects["ConfigMap"], tmp_path)
    resources = container_of(objects["Deployment"])["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    limit_mb = _mebibytes(resources["limits"]["memory"])
    if settings.vram_budget_mb is not None:  # CPU: the budget is host memory
        assert settings.vram_budget_mb + settings.vram_margin_mb <= limit_mb


def test_gpu_variant_asks_for_one_gpu_and_the_cuda_image(tmp_path: Path) -> None:
    gpu = tmp_path / "gpu.yaml"
    gpu.write_text(render("gpu"))
    objects = manifests(gpu)
    container = container_of(objects["Deployment"])
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith("-cuda")
    settings = settings_of(objects["ConfigMap"], tmp_path)
    assert settings.vram_budget_mb is None  # the whole card, read through NVML
    cpu = tmp_path / "cpu.yaml"
    cpu.write_text(render("cpu"))
    assert "nvidia.com/gpu" not in cpu.read_text()
    assert not container_of(manifests(cpu)["Deployment"])["image"].endswith("-cuda")


def _mebibytes(quantity: str) -> int:
    units = {"Mi": 1, "Gi": 1024}
    return int(quantity[:-2]) * units[quantity[-2:]]
