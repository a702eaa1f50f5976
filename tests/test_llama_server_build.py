"""The llama-server build module of ``nox -s bench_llama_server``: a cached binary is
found, an absent one that cannot be built is a clear :class:`BuildUnavailable` (the
session's skip), never a crash. The build itself (10-40 minutes) is not run here."""

from __future__ import annotations

from pathlib import Path

import pytest
from benchmarks.llama_server_build import BuildUnavailable, find_or_build, llama_server_path


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MODELD_BENCH_CACHE", str(tmp_path))
    return tmp_path


def test_the_cached_binary_is_found_without_building(cache: Path) -> None:
    binary = llama_server_path("9.9.9")
    assert binary.is_relative_to(cache)
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    assert find_or_build("9.9.9", build=False) == binary


def test_an_absent_binary_without_building_is_unavailable(cache: Path) -> None:
    with pytest.raises(BuildUnavailable, match="absent"):
        find_or_build("9.9.9", build=False)


def test_an_absent_binary_without_cmake_is_unavailable(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools"))
    with pytest.raises(BuildUnavailable, match="cmake is not installed"):
        find_or_build("9.9.9")
    assert not (cache / "src").exists()  # nothing downloaded
