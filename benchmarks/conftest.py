"""Raw ``Llama`` references in benchmarks run the kernels modeld's own models run; the
llama-server binary the benchmarks against it share."""

from pathlib import Path

import pytest
from benchmarks.llama_server_build import BuildUnavailable, find_or_build

from modeld.engine.cpu_quirks import apply_cpu_quirks

apply_cpu_quirks()


@pytest.fixture(scope="session")
def binary() -> Path:
    """The cached llama-server (``nox -s bench_llama_server`` builds it); skips without."""
    try:
        return find_or_build(build=False)
    except BuildUnavailable as exc:
        pytest.skip(f"llama-server unavailable: {exc} (nox -s bench_llama_server builds it)")
