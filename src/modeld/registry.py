"""The models directory: model id -> a path that is provably inside it.

This is the one validator for model ids; every endpoint and the library go through
:meth:`Registry.resolve`, so nothing outside the directory can ever be opened.

The event loop never touches the filesystem itself: :meth:`Registry.lookup` and
:meth:`Registry.rescan` run the blocking calls on a few threads of their own, with a
deadline, so a models dir on a mount that stops answering fails requests with
:class:`ModelsDirUnavailable` instead of freezing every model.
"""

from __future__ import annotations

import os
import re
import stat
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio

from modeld.errors import InvalidModelId, ModelNotFound, ModelsDirUnavailable
from modeld.gguf import FileIdentity

__all__ = ["FS_TIMEOUT_S", "ModelFile", "Registry", "check_model_id", "check_model_name"]

FS_TIMEOUT_S = 10.0
_FS_THREADS = 4  # a stalled mount holds at most these; later calls time out waiting
T = TypeVar("T")

_SHOWN_NAME_CHARS = 120  # a name echoed in an error, at most
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-]{0,250}\.gguf$")


@dataclass(frozen=True, slots=True)
class ModelFile:
    id: str
    path: Path
    identity: FileIdentity  # changes when the file is rewritten in place or replaced

    @property
    def size_bytes(self) -> int:
        return self.identity.size_bytes

    @property
    def name(self) -> str:
        return self.id


def _check_never_valid(model_id: str) -> None:
    """Raises :class:`InvalidModelId` for what no name can hold: NUL, a path
    separator, ``..``."""
    if "\x00" in model_id:
        raise InvalidModelId("model id must not contain NUL")
    if "/" in model_id or "\\" in model_id or model_id in {".", ".."} or ".." in model_id:
        raise InvalidModelId("model id must be a bare file name, without path separators or '..'")


def check_model_id(model_id: str) -> str:
    """Reject anything but a bare ``*.gguf`` file name. Raises :class:`InvalidModelId`."""
    _check_never_valid(model_id)
    if unicodedata.normalize("NFC", model_id) != model_id or not _SAFE_ID.match(model_id):
        raise InvalidModelId(
            "model id must be a file name ending in .gguf made of letters, digits, '.', '_', "
            "'+' and '-'"
        )
    return model_id


def check_model_name(model_id: str) -> str:
    """A model a request names (an alias already resolved): a name no file could have
    is simply not a model here (:class:`ModelNotFound`, a 404, as OpenAI and Ollama
    answer ``gpt-4o``); only what can never be valid in any name (NUL, a separator,
    ``..``) raises :class:`InvalidModelId`."""
    _check_never_valid(model_id)
    try:
        return check_model_id(model_id)
    except InvalidModelId:
        shown = model_id[:_SHOWN_NAME_CHARS] + ("…" if len(model_id) > _SHOWN_NAME_CHARS else "")
        raise ModelNotFound(f"model {shown!r} not found") from None


class Registry:
    """Scans ``models_dir`` for ``*.gguf`` files; rescans on demand (no restart needed)."""

    def __init__(self, models_dir: Path, *, timeout_s: float = FS_TIMEOUT_S) -> None:
        self._root = models_dir.expanduser()
        self._timeout_s = timeout_s
        self._limiter: anyio.CapacityLimiter | None = None

    async def lookup(self, model_id: str) -> ModelFile:
        """:meth:`resolve` off the event loop. Also raises :class:`ModelsDirUnavailable`
        when the filesystem does not answer within the deadline."""
        check_model_id(model_id)
        return await self._off_loop(lambda: self._inspect(model_id))

    async def rescan(self) -> list[ModelFile]:
        """:meth:`scan` off the event loop, with the same deadline as :meth:`lookup`."""
        return await self._off_loop(self.scan)

    async def _off_loop(self, call: Callable[[], T]) -> T:
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(_FS_THREADS)
        try:
            with anyio.fail_after(self._timeout_s):
                # a thread stuck in stat() cannot be stopped: it is left to finish alone
                return await anyio.to_thread.run_sync(
                    call, abandon_on_cancel=True, limiter=self._limiter
                )
        except TimeoutError:
            raise ModelsDirUnavailable(
                f"the models dir did not answer within {self._timeout_s:g} s"
            ) from None

    def scan(self) -> list[ModelFile]:
        """Re-read the directory. A missing directory is an empty registry, not an error."""
        found: list[ModelFile] = []
        try:
            entries = sorted(os.scandir(self._root), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            entries = []
        for entry in entries:
            if not entry.name.endswith(".gguf"):
                continue
            try:
                found.append(self._inspect(check_model_id(entry.name)))
            except (InvalidModelId, ModelNotFound):
                continue
        return found

    def resolve(self, model_id: str) -> ModelFile:
        """The file for ``model_id``, looked up on disk each time (a file added later is
        found without a restart, a changed one is seen as changed).

        Raises :class:`InvalidModelId` for unsafe ids and :class:`ModelNotFound` otherwise.
        """
        check_model_id(model_id)
        return self._inspect(model_id)

    @property
    def timeout_s(self) -> float:
        """How long a filesystem call may take before the models dir counts as unavailable."""
        return self._timeout_s

    def unchanged(self, model: ModelFile) -> bool:
        """Blocking, one ``stat()`` (for the model's worker thread, which runs it as the
        first step of a request to the loaded model): True when ``model.id`` still names
        the very file ``model`` was loaded from, a readable regular file. False when
        anything differs or fails: the caller then looks it up in full (:meth:`lookup`)."""
        candidate = self._root / model.id
        try:
            info = os.stat(candidate)
        except OSError:
            return False
        return (
            stat.S_ISREG(info.st_mode)
            and FileIdentity.of(info) == model.identity
            and os.access(candidate, os.R_OK)
        )

    def _inspect(self, model_id: str) -> ModelFile:
        candidate = self._root / model_id
        try:
            real = candidate.resolve(strict=True)
            root = self._root.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise ModelNotFound(f"model {model_id!r} not found in the models dir") from exc
        if real.parent != root:
            raise InvalidModelId(f"model {model_id!r} resolves outside the models dir")
        try:
            info = real.stat()
        except OSError as exc:
            raise ModelNotFound(f"model {model_id!r} cannot be read: {exc.strerror}") from exc
        if not stat.S_ISREG(info.st_mode):
            raise ModelNotFound(f"model {model_id!r} is not a regular file")
        if not os.access(real, os.R_OK):
            raise ModelNotFound(f"model {model_id!r} is not readable")
        return ModelFile(model_id, real, FileIdentity.of(info))
