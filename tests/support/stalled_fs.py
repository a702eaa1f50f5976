"""A FUSE filesystem whose reads never return: a stalled mount (a hung NFS server, a
FUSE daemon that stopped answering). It shows the files of a source directory with
their real sizes; listing and ``stat`` answer at once, every ``read`` blocks for ever
(after printing ``read <path>`` on stdout, so that a test knows a reader is stuck).

    python -m tests.support.stalled_fs SOURCE MOUNTPOINT [ALLOW_PID_FILE]

With ``ALLOW_PID_FILE``, reads by the process whose pid that file holds (once it exists)
are served from the source; everyone else's stall (a server whose own reads work while
its probe child's hang).

runs in the foreground until it is killed (a blocked read keeps it from ending on
SIGTERM): unmount first (``fusermount3 -u MOUNTPOINT``), then SIGKILL. Needs
``/dev/fuse``, libfuse (``fuse3``) and ``mfusepy``.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import threading
from pathlib import Path
from typing import Any

from mfusepy import FUSE, FuseOSError, Operations, fuse_get_context


class StalledFs(Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, source: Path, allow_pid_file: Path | None = None) -> None:
        self.source = source
        self.allow_pid_file = allow_pid_file
        self.never = threading.Event()

    def _path(self, path: str) -> Path:
        return self.source / path.lstrip("/")

    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        if path == "/":
            return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
        target = self._path(path)
        if not target.is_file():
            raise FuseOSError(errno.ENOENT)
        info = target.stat()
        return {"st_mode": stat.S_IFREG | 0o644, "st_nlink": 1, "st_size": info.st_size,
                "st_mtime": info.st_mtime_ns, "st_ctime": info.st_ctime_ns,
                "st_atime": info.st_atime_ns, "st_ino": info.st_ino}  # fmt: skip

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *sorted(p.name for p in self.source.iterdir() if p.is_file())]

    def open(self, path: str, flags: int) -> int:
        return 0

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        reader = _process_of(fuse_get_context()[2])
        if reader is not None and reader == self._allowed():
            with self._path(path).open("rb") as source:
                source.seek(offset)
                return source.read(size)
        print(f"read {path} by {reader}", flush=True)  # a test waits for this: it is stuck
        self.never.wait()  # the stall
        return b""

    def _allowed(self) -> int | None:
        try:
            return int(self.allow_pid_file.read_text()) if self.allow_pid_file else None
        except (OSError, ValueError):
            return None


def _process_of(thread_id: int) -> int | None:
    """The process (thread group) a kernel thread id belongs to."""
    try:
        status = Path(f"/proc/{thread_id}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("Tgid:"):
            return int(line.split()[1])
    return None


def main() -> None:
    source, mountpoint = Path(sys.argv[1]), sys.argv[2]
    allow = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    os.makedirs(mountpoint, exist_ok=True)
    FUSE(StalledFs(source, allow), mountpoint, foreground=True, nothreads=False, ro=True)


if __name__ == "__main__":
    main()
