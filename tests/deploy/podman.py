"""podman driven from tests: a private containers.conf, and cleanup of exactly what was made.

The machines this runs on (2 cores, cgroups v1/hybrid, no way to raise RLIMIT_NOFILE) need
runc instead of crun and fixed ulimits (shared/research/infra.md); the file is passed through
``CONTAINERS_CONF`` so that the machine's own configuration is left alone. Every container
and image a test makes is recorded here and removed by name at the end, never by a pattern:
other people's containers may run on the same machine.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["BuildResult", "Container", "Podman", "ensure_tools", "unique_name"]

CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
runtime = "runc"
"""
# Debian package for each command the container tests run.
TOOLS = {"podman": "podman", "buildah": "buildah", "debootstrap": "debootstrap", "runc": "runc"}


def ensure_tools() -> None:
    """Install podman, buildah, debootstrap and runc with apt where they are missing."""
    missing = sorted({pkg for cmd, pkg in TOOLS.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"missing {missing}; install them (apt-get install {' '.join(missing)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env, timeout=600)
    subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env, timeout=900)


def unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Podman:
    """Runs podman with the private configuration; remembers what it created."""

    workdir: Path
    containers: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    layers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.conf_path = self.workdir / "containers.conf"
        self.conf_path.write_text(CONTAINERS_CONF)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "CONTAINERS_CONF": str(self.conf_path)}

    def __call__(
        self, *args: str, timeout_s: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{_without_systemd_noise(result.stderr)[-4000:]}"
            )
        return result

    def build(
        self,
        context: Path,
        tag: str,
        *,
        build_args: Mapping[str, str] | None = None,
        volumes: Sequence[str] = (),
        target: str | None = None,
        log_path: Path,
        check: bool = True,
        timeout_s: float = 2400,
    ) -> BuildResult:
        """Build with the Docker format (the OCI one drops HEALTHCHECK)."""
        command = ["podman", "build", "--format", "docker", "--force-rm", "-t", tag]
        for name, value in (build_args or {}).items():
            command += ["--build-arg", f"{name}={value}"]
        for volume in volumes:
            command += ["-v", volume]
        if target:
            command += ["--target", target]
        command.append(str(context))
        self.images.append(tag)
        existing = self.image_ids()
        started = time.monotonic()
        with log_path.open("w") as log:
            result = subprocess.run(
                command, env=self.env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            )
        built = BuildResult(time.monotonic() - started, result.returncode, log_path.read_text())
        # A stage that is only a FROM prints its base's ID too: only IDs new to the store.
        self.layers += [
            layer
            for layer in new_layers(built.log)
            if not any(full.startswith(layer) for full in existing)
        ]
        if check and built.returncode != 0:
            raise AssertionError(
                f"podman build of {tag} exited {built.returncode}:\n{built.log[-6000:]}"
            )
        return built

    def import_rootfs(self, rootfs: Path, tag: str) -> None:
        self.images.append(tag)
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            subprocess.run(
                ["podman", "import", "-", tag],
                stdin=tar.stdout,
                env=self.env,
                check=True,
                capture_output=True,
                timeout=600,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            assert tar.wait(timeout=60) == 0

    def image_ids(self) -> set[str]:
        listed = self("images", "--all", "--quiet", "--no-trunc").stdout.split()
        return {image_id.removeprefix("sha256:") for image_id in listed}

    def image_size_bytes(self, tag: str) -> int:
        return int(self("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())

    def start(self, image: str, *args: str, options: Sequence[str] = ()) -> Container:
        """``podman run -d`` under a fresh name; ``args`` go to the entrypoint."""
        name = unique_name("modeld-test")
        self.containers.append(name)
        self("run", "-d", "--name", name, *options, image, *args)
        return Container(self, name)

    def remove_created(self) -> None:
        """Remove this run's containers, its tagged images, then the layers its builds made
        (newest first; one that something else still uses stays)."""
        for name in reversed(self.containers):
            self("rm", "--force", "--time", "5", name, check=False)
        for tag in reversed(self.images):
            self("rmi", "--force", tag, check=False, timeout_s=300)
        for layer in reversed(self.layers):
            self("rmi", layer, check=False, timeout_s=300)
        self.containers.clear()
        self.images.clear()
        self.layers.clear()


@dataclass(frozen=True)
class BuildResult:
    elapsed_s: float
    returncode: int
    log: str


@dataclass
class Container:
    podman: Podman
    name: str

    def exec(self, *command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.podman("exec", self.name, *command, check=check)

    def inspect(self, template: str) -> str:
        return self.podman("inspect", "--format", template, self.name).stdout.strip()

    def logs(self) -> str:
        result = self.podman("logs", self.name, check=False)
        return result.stdout + _without_systemd_noise(result.stderr)

    def host_port(self, container_port: int = 8080) -> int:
        """The host port published for ``container_port`` (podman picked a free one)."""
        out = self.podman("port", self.name, f"{container_port}/tcp").stdout.strip()
        return int(out.splitlines()[0].rsplit(":", 1)[1])

    def pid1_status(self) -> dict[str, str]:
        status = self.exec("cat", "/proc/1/status").stdout
        return dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)

    @contextlib.contextmanager
    def diagnostics(self) -> Iterator[None]:
        """Attach the container's log to whatever assertion fails inside the block."""
        try:
            yield
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n--- {self.name} log ---\n{self.logs()[-6000:]}") from exc


def new_layers(build_log: str) -> list[str]:
    """The layer images a build committed: each step ends in "--> ID"; a step taken from
    the cache (maybe another build's) says "--> Using cache FULL_ID" first."""
    reused = set(re.findall(r"^--> Using cache ([0-9a-f]{64})$", build_log, flags=re.MULTILINE))
    return [
        layer
        for layer in re.findall(r"^--> ([0-9a-f]{11,64})$", build_log, flags=re.MULTILINE)
        if not any(full.startswith(layer) for full in reused)
    ]


def _without_systemd_noise(stderr: str) -> str:
    """podman asks for systemd (absent here) to schedule health checks on every call."""
    return "\n".join(
        line for line in stderr.splitlines() if "unable to get systemd connection" not in line
    )
