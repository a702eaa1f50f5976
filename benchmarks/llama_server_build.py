"""The native ``llama-server`` built from the llama.cpp that the pinned llama-cpp-python
vendors, so that modeld is measured against the same kernels in a C++ server.

The sdist is fetched with pip (``--no-binary :all:``: the source, not a wheel), its
``vendor/llama.cpp`` configured with CMake and only the ``llama-server`` target built
(10-40 minutes on 2 cores). The result is cached under
``~/.cache/modeld-bench/build-VERSION`` and reused; nothing is rebuilt when
``bin/llama-server`` is there. ``python -m benchmarks.llama_server_build`` builds (or
finds) it and prints its path; the nox session ``bench_llama_server`` calls it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["BuildUnavailable", "cache_root", "find_or_build", "llama_server_path", "pinned_version"]

_BUILD_TIMEOUT_S = 3 * 3600


class BuildUnavailable(Exception):
    """The binary is absent and cannot be built here (the message says why)."""


def pinned_version() -> str:
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise BuildUnavailable("llama-cpp-python is not installed") from None


def cache_root() -> Path:
    return Path(os.environ.get("MODELD_BENCH_CACHE", "~/.cache/modeld-bench")).expanduser()


def llama_server_path(llama_cpp_version: str) -> Path:
    return cache_root() / f"build-{llama_cpp_version}" / "bin" / "llama-server"


def find_or_build(llama_cpp_version: str | None = None, *, build: bool = True) -> Path:
    """The cached binary, built first when absent and ``build``. Raises
    :class:`BuildUnavailable` (no pip, no CMake or compiler, no network, a failed
    build: the log is ``cache_root()/cmake-VERSION.log``)."""
    llama_cpp_version = llama_cpp_version or pinned_version()
    binary = llama_server_path(llama_cpp_version)
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if not build:
        raise BuildUnavailable(f"{binary} is absent (building was not asked for)")
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise BuildUnavailable(f"{binary} is absent and {tool} is not installed")
    source = _vendored_llama_cpp(llama_cpp_version)
    build_dir = binary.parents[1]
    log_path = cache_root() / f"cmake-{llama_cpp_version}.log"
    jobs = str(os.cpu_count() or 1)
    steps = [
        ["cmake", "-S", str(source), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
         "-DLLAMA_BUILD_SERVER=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
         "-DLLAMA_CURL=OFF"],
        ["cmake", "--build", str(build_dir), "--target", "llama-server", "-j", jobs],
    ]  # fmt: skip
    with log_path.open("ab") as log:
        for step in steps:
            _run(step, log, log_path)
    if not binary.is_file():
        raise BuildUnavailable(f"the build finished without {binary} (see {log_path})")
    return binary


def _vendored_llama_cpp(llama_cpp_version: str) -> Path:
    """``vendor/llama.cpp`` of the sdist, downloaded and unpacked once."""
    src_root = cache_root() / "src"
    unpacked = src_root / f"llama_cpp_python-{llama_cpp_version}"
    vendored = unpacked / "vendor" / "llama.cpp"
    if (vendored / "CMakeLists.txt").is_file():
        return vendored
    src_root.mkdir(parents=True, exist_ok=True)
    download = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--dest", str(src_root), f"llama-cpp-python=={llama_cpp_version}",
    ]  # fmt: skip
    done = subprocess.run(download, capture_output=True, check=False, timeout=1800)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-400:]
        raise BuildUnavailable(f"pip download of llama-cpp-python failed: {tail}")
    archives = sorted(src_root.glob(f"llama_cpp_python-{llama_cpp_version}.tar.gz"))
    if not archives:
        raise BuildUnavailable(f"pip download left no sdist in {src_root}")
    with tarfile.open(archives[0]) as archive:
        archive.extractall(src_root, filter="data")
    if not (vendored / "CMakeLists.txt").is_file():
        raise BuildUnavailable(f"the sdist has no vendor/llama.cpp ({unpacked})")
    return vendored


def _run(command: list[str], log: object, log_path: Path) -> None:
    try:
        done = subprocess.run(
            command, stdout=log, stderr=subprocess.STDOUT, check=False,  # type: ignore[arg-type]
            timeout=_BUILD_TIMEOUT_S,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BuildUnavailable(f"{command[0]} failed: {exc} (see {log_path})") from exc
    if done.returncode != 0:
        raise BuildUnavailable(f"{' '.join(command[:3])} exited {done.returncode} (see {log_path})")


def main() -> int:
    try:
        print(find_or_build())
    except BuildUnavailable as exc:
        print(f"llama-server unavailable: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
