"""A Debian bookworm base image made here with debootstrap: no image registry is reachable.

The mirror is the one apt on this machine already uses (read from its sources, never a
host written here), so the build reaches the same Debian registry apt does.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.deploy.podman import Podman

__all__ = ["SUITE", "debian_mirror", "make_base_image"]

SUITE = "bookworm"
APT_SOURCES = Path("/etc/apt")


def _deb822_mirrors(text: str) -> list[str]:
    mirrors = []
    for stanza in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, value = line.split(":", 1)
            fields[key.strip().lower()] = value.strip()
        if (
            "deb" in fields.get("types", "").split()
            and SUITE in fields.get("suites", "").split()
            and "main" in fields.get("components", "").split()
            and fields.get("enabled", "yes").lower() != "no"
        ):
            mirrors += fields.get("uris", "").split()
    return mirrors


def _one_line_mirrors(text: str) -> list[str]:
    mirrors = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if words[:1] != ["deb"]:
            continue
        words = [w for w in words[1:] if not w.startswith("[")]  # drop [arch=...] options
        if len(words) >= 3 and words[1] == SUITE and "main" in words[2:]:
            mirrors.append(words[0])
    return mirrors


def debian_mirror(apt_dir: Path = APT_SOURCES) -> str:
    """The first ``deb`` source of bookworm's main component in apt's configuration."""
    mirrors: list[str] = []
    for path in sorted((apt_dir / "sources.list.d").glob("*.sources")):
        mirrors += _deb822_mirrors(path.read_text())
    for path in [apt_dir / "sources.list", *sorted((apt_dir / "sources.list.d").glob("*.list"))]:
        if path.is_file():
            mirrors += _one_line_mirrors(path.read_text())
    if not mirrors:
        raise RuntimeError(f"no '{SUITE} main' deb source in {apt_dir}; cannot debootstrap")
    return mirrors[0]


def make_base_image(podman: Podman, tag: str, workdir: Path) -> None:
    """debootstrap a minimal bookworm (no Python: the Dockerfile must put it in, as on the
    CUDA images) and import it as ``tag``."""
    rootfs = workdir / "rootfs"
    subprocess.run(
        [
            "debootstrap", "--variant=minbase", "--include=ca-certificates",
            SUITE, str(rootfs), debian_mirror(),
        ],
        check=True, capture_output=True, timeout=900,
    )  # fmt: skip
    for leftover in [*rootfs.glob("var/cache/apt/archives/*.deb"), rootfs / "var/lib/apt/lists"]:
        if leftover.is_dir():
            shutil.rmtree(leftover)
            leftover.mkdir()
        else:
            leftover.unlink()
    podman.import_rootfs(rootfs, tag)
    shutil.rmtree(rootfs)
