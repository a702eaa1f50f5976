"""Task runner: `nox -s tests`, `nox -s lint`, `nox -s bench`, `nox -s bench_llama_server`,
`nox -s sanitize`, `nox -s soak`, `nox -s ray`, `nox -s image`, `nox -s systemd`
(docs/deploy.md), `nox -s fuzz`."""

from __future__ import annotations

import nox
import nox.command

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("-e", ".[dev]")
    session.run("ruff", "check", "src", "tests", "benchmarks", "examples")
    session.run("ruff", "format", "--check", "src", "tests", "benchmarks", "examples")
    session.run("mypy")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[test]")
    session.run(
        "python", "-m", "pytest", "benchmarks", "--benchmark-only", "-p", "no:randomly",
        *session.posargs,
    )  # fmt: skip


@nox.session
def bench_llama_server(session: nox.Session) -> None:
    """modeld against the native llama-server built from the vendored llama.cpp of the
    pinned llama-cpp-python (benchmarks/llama_server_build.py: built once, 10-40 minutes,
    cached in ~/.cache/modeld-bench); skipped when it cannot be built. Not in .ci/run."""
    session.install("-e", ".[test]")
    try:
        session.run("python", "-m", "benchmarks.llama_server_build", env={"PYTHONPATH": "."})
    except nox.command.CommandFailed:
        session.skip("llama-server is absent and could not be built (see the message above)")
    session.run(
        "python", "-m", "pytest", "benchmarks/test_bench_llama_server.py", "--benchmark-only",
        "-p", "no:randomly", "-s", *session.posargs,
    )  # fmt: skip


@nox.session
def sanitize(session: nox.Session) -> None:
    """The C extension built with AddressSanitizer, then its tests."""
    session.env["MODELD_C_SANITIZE"] = "address"
    session.install("-e", ".[test]")
    # Python itself is not instrumented: the ASan runtime must be preloaded.
    libasan = session.run("gcc", "-print-file-name=libasan.so", silent=True, external=True)
    session.env["LD_PRELOAD"] = str(libasan).strip()
    session.env["ASAN_OPTIONS"] = "detect_leaks=0"
    session.env["PYTHONMALLOC"] = "malloc"
    session.run("python", "-m", "pytest", "tests/engine", *session.posargs)


@nox.session
def soak(session: nox.Session) -> None:
    """About ten minutes of concurrent clients abusing a real server; not in CI's run."""
    session.install("-e", ".[test]")
    session.run("python", "benchmarks/soak.py", *session.posargs, env={"PYTHONPATH": "."})


@nox.session
def ray(session: nox.Session) -> None:
    """The scale-out tests on a local Ray cluster (the `ray` extra, about 490 MB)."""
    session.install("-e", ".[test,ray]")
    session.run("python", "-m", "pytest", "tests/ray", *session.posargs)


_FUZZ_TARGETS = {
    # target: (harness, seed writer, libFuzzer flags of its own)
    "gguf": ("tests/fuzz/fuzz_gguf_header.py", "tests.fuzz.seeds", ["-max_len=131072"]),
    "schema": (
        "tests/fuzz/fuzz_schema_grammar.py",
        "tests.fuzz.schema_seeds",
        ["-max_len=65536"],
    ),
}


@nox.session
@nox.parametrize("target", list(_FUZZ_TARGETS), ids=list(_FUZZ_TARGETS))
def fuzz(session: nox.Session, target: str) -> None:
    """atheris for a fixed time (default 300 s; pass libFuzzer flags after --) on the GGUF
    header validator (``nox -s "fuzz(gguf)"``) or the JSON-schema-to-GBNF converter
    (``nox -s "fuzz(schema)"``); ``nox -s fuzz`` runs both. Crashers land in
    tests/fuzz/crashers/ (``schema-`` for the converter's), which
    tests/gguf/test_fuzz_crashers.py and tests/grammar/test_fuzz_crashers.py replay."""
    harness, seed_module, flags = _FUZZ_TARGETS[target]
    session.install("-e", ".[test,fuzz]")
    seeds = session.create_tmp() + f"/seeds-{target}"
    corpus = session.create_tmp() + f"/corpus-{target}"
    prefix = "tests/fuzz/crashers/" + ("schema-" if target == "schema" else "")
    session.run("python", "-m", seed_module, seeds)
    session.run("mkdir", "-p", corpus, "tests/fuzz/crashers", external=True)
    session.run(
        "python", harness, "-max_total_time=300", "-timeout=10", "-rss_limit_mb=2048",
        *flags, f"-artifact_prefix={prefix}", "-print_final_stats=1", *session.posargs,
        corpus, seeds, env={"PYTHONPATH": "."},
    )  # fmt: skip


def _container_tests(session: nox.Session, *paths: str) -> None:
    """Run tests/deploy/container: as root, with apt (podman, debootstrap) and the network
    to the Debian and PyPI registries; everything made is removed at the end."""
    session.install("-e", ".[test]")
    session.env["MODELD_CONTAINER_TESTS"] = "1"
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *paths, *session.posargs)


@nox.session
def image(session: nox.Session) -> None:
    """Build the Dockerfile on a debootstrapped Debian base, run it, check it; the CUDA
    argument as far as CMake; hadolint and the Kubernetes manifests."""
    _container_tests(
        session,
        "tests/deploy/container/test_image.py",
        "tests/deploy/container/test_cuda_build.py",
        "tests/deploy/test_static.py",
        "tests/deploy/test_k8s.py",
    )


@nox.session
def systemd(session: nox.Session) -> None:
    """deploy/modeld.service under systemd in a container (builds the image first)."""
    _container_tests(session, "tests/deploy/container/test_systemd.py")
