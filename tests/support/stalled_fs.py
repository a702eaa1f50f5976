"""A FUSE filesystem whose reads never return: a stalled mount (a hung NFS server, a
FUSE daemon that stopped answering). It shows the files of a source directory with
their real sizes; listing and ``stat`` answer at once, every ``read`` blocks for ever
(after printing ``read <path>`` on stdout, so that a test knows a reader is stuck).

    python -m tests.support.stalled_fs SOURCE MOUNTPOINT

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

from mfusepy import FUSE, FuseOSError, Operations


class StalledFs(Operations):  # type: ignore[misc]
    use_ns = True

    def __init__(self, source: Path) -> None:
        self.source = source
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
        print(f"read {path}", flush=True)  # what a test waits for: a reader is stuck now
        self.never.wait()  # the stall
        return b""


def main() -> None:
    source, mountpoint = Path(sys.argv[1]), sys.argv[2]
    os.makedirs(mountpoint, exist_ok=True)
    FUSE(StalledFs(source), mountpoint, foreground=True, nothreads=False, ro=True)


if __name__ == "__main__":
    main()
