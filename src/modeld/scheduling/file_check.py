"""A loaded model's file, checked as the first step of a request's job on the model's
worker: one ``stat()`` there instead of a lookup on a filesystem thread (a thread hop
there and back, on a request's way to its first byte).

A file rewritten, replaced or deleted under a loaded (mmapped) model must not be used:
when the quick check does not pass, the job ends with :class:`FileChanged` before
anything is prepared, and the event loop looks the file up in full
(:func:`replaced_file`), unloading the instance when the file did change.
A stalled mount stalls the worker's ``stat()``: the request is answered
:class:`ModelsDirUnavailable` after the registry's own deadline (the model stays busy
until the call comes back, as a lookup thread stays stuck in it).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, TypeVar

import anyio

from modeld.errors import InvalidModelId, ModeldError, ModelNotFound, ModelsDirUnavailable
from modeld.registry import ModelFile, Registry
from modeld.types import DoneReason

if TYPE_CHECKING:
    from modeld.engine.worker import ThreadCall
    from modeld.scheduling.instance import Instance
    from modeld.scheduling.unloading import Unloader

__all__ = ["FileChanged", "WorkerFileCheck", "replaced_file"]

T = TypeVar("T")


class FileChanged(Exception):
    """The worker's quick check did not find the loaded file as it was loaded."""


class WorkerFileCheck:
    """One request's check of ``model`` (None: none, the file was just looked up)."""

    def __init__(self, registry: Registry, model: ModelFile | None) -> None:
        self._registry = registry
        self._model = model
        self._passed = threading.Event()

    def run(self) -> None:
        """On the worker, first: raises :class:`FileChanged` unless the file is the one
        loaded (blocks while the filesystem does)."""
        if self._model is not None and not self._registry.unchanged(self._model):
            raise FileChanged(self._model.id)
        self._passed.set()

    async def signalled(self, call: ThreadCall[T]) -> bool:
        """``call.signalled()``, bounded by the registry's deadline until the check has
        passed. Raises :class:`ModelsDirUnavailable` when the check does not come back
        in time, :class:`FileChanged` when it did not pass."""
        with anyio.move_on_after(self._registry.timeout_s):
            return await call.signalled()
        if self._passed.is_set():  # past the check: preparing a long prompt takes its time
            return await call.signalled()
        raise ModelsDirUnavailable(
            f"the models dir did not answer within {self._registry.timeout_s:g} s"
        )


async def replaced_file(
    registry: Registry, unloader: Unloader, instance: Instance
) -> ModelFile | None:
    """The full lookup of a ready instance's file: None when it is the one loaded; the
    file as it is now when it is not, after unloading the instance (loaded anew from it).
    Raises the lookup's error for a file that is gone (after unloading: deleted, 404, or
    no longer a valid id), :class:`ModelsDirUnavailable`."""
    try:
        current: ModelFile | ModeldError = await registry.lookup(instance.model_id)
    except (ModelNotFound, InvalidModelId) as exc:
        current = exc
    if isinstance(current, ModelFile) and current.identity == instance.model.identity:
        return None
    await unloader.unload(instance, DoneReason.EVICTED, cause="file_changed")
    if isinstance(current, ModeldError):
        raise current
    return current
