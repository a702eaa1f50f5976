"""The CUDA build path, as far as a machine without the CUDA toolkit can take it.

``--build-arg CUDA=1`` must reach llama.cpp's CMake (which then looks for nvcc) and must
not be answered by the CPU wheel in pip's cache. The build stage runs on the local base
until CMake stops; the full CUDA build needs the nvidia/cuda images (docs/deploy.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.container.conftest import REPO, BuildVolumes, skip_unless_enabled
from tests.deploy.podman import Podman, unique_name

skip_unless_enabled()
pytestmark = pytest.mark.timeout(1200)


def test_cuda_argument_reaches_cmake_and_bypasses_the_cpu_wheel(
    podman: Podman,
    base_image: str,
    build_volumes: BuildVolumes,
    tmp_path: Path,
) -> None:
    built = podman.build(
        REPO,
        f"localhost/{unique_name('modeld-test')}:cuda-build",
        build_args={"CUDA": "1", "BASE_BUILD": base_image, "BASE_RUN": base_image},
        volumes=build_volumes.volumes,
        target="build",
        log_path=tmp_path / "build.log",
        check=False,
    )
    assert built.returncode != 0, "built without a CUDA toolkit: CUDA=1 did not reach CMake"
    assert "-- Could not find nvcc" in built.log
    assert "CUDA Toolkit not found" in built.log
    assert "Downloading llama_cpp_python-" in built.log  # the source, not a cached wheel
    assert "Using cached llama_cpp_python" not in built.log
