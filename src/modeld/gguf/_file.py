"""A model file opened once, validated and loaded through the same descriptor.

Validating a path and then letting llama.cpp open the path again leaves a window in
which the file can be swapped (``os.replace``) for one the validator never saw; some
such files abort the process. :class:`OpenGguf` keeps one descriptor from validation to
load and names the file to llama.cpp as ``/proc/self/fd/N``: opening that path opens
the very inode behind the descriptor (Linux), even once the name points elsewhere or
is gone. llama.cpp opens it twice (metadata, then weights, mmapped or read) and both
see that inode. A child process given the descriptor (``pass_fds``) opens it the same
way. Split models are refused by the validator: llama.cpp would find their other parts
by name.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import TracebackType
from typing import Self

from modeld.gguf._header import (
    FileIdentity,
    GgufHeader,
    open_regular_file,
    read_header_from_fd,
)
from modeld.sizes import MAX_CONTEXT_TOKENS

__all__ = ["OpenGguf"]


class OpenGguf:
    """An open, regular model file. Close it (or use ``with``) once llama.cpp has it.

    Raises :class:`ModelInvalid` when ``path`` cannot be opened or is not a regular file.
    ``label`` names the file in messages (the model id: never an absolute path).
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path = path
        self.label = label
        self._fd: int | None = open_regular_file(path, label)
        self.identity = FileIdentity.of(os.fstat(self._fd))

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError("the model file is closed")
        return self._fd

    @property
    def load_path(self) -> str:
        """What to give llama.cpp (in this process, or a child given :attr:`fd`)."""
        return f"/proc/self/fd/{self.fd}"

    def header(self, *, max_context_length: int = MAX_CONTEXT_TOKENS) -> GgufHeader:
        """The validated header of the opened inode (:class:`ModelInvalid` if bad)."""
        return read_header_from_fd(self.fd, self.path, self.label, max_context_length)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
