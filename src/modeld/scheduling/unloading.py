"""Unloading: an instance's running generation ends, its engine closes on its own
worker (after any running loop), and it leaves the table and the budget; at shutdown,
every instance within a time limit, abandoning a worker hung in llama.cpp.

Everything here runs on the event loop.
"""

from __future__ import annotations

import anyio
from loguru import logger

from modeld.errors import ModelNotFound
from modeld.events import EventHub, ModelEvicted
from modeld.memory.budget import MemoryBudget
from modeld.registry import check_model_id
from modeld.scheduling.instance import Instance
from modeld.scheduling.room import Changes
from modeld.types import DoneReason, InstanceState

__all__ = ["Unloader"]


class Unloader:
    """Unloads from ``instances`` (the pool's table, shared)."""

    def __init__(
        self,
        instances: dict[str, Instance],
        budget: MemoryBudget,
        events: EventHub,
        changes: Changes,
    ) -> None:
        self._instances = instances
        self._budget = budget
        self._events = events
        self._changes = changes

    async def unload_model(self, model_id: str) -> None:
        """Unload a model, cancelling its running generation (done_reason ``evicted``).

        Raises :class:`InvalidModelId` for unsafe ids, :class:`ModelNotFound` when it is
        not loaded.
        """
        instance = self._instances.get(check_model_id(model_id))
        if instance is None:
            raise ModelNotFound(f"model {model_id!r} is not loaded")
        await self.unload(instance, DoneReason.EVICTED, cause="unload")

    async def unload_all(self, reason: DoneReason, within_s: float) -> list[str]:
        """Unload every instance, giving them ``within_s`` together; returns the ids of
        those abandoned because their worker did not stop (hung in llama.cpp).

        An abandoned instance leaves the table and the budget at once; its thread is
        left to end on its own (it is a daemon: it cannot keep the process alive).
        """
        instances = list(self._instances.values())
        async with anyio.create_task_group() as unloads:
            for instance in instances:
                unloads.start_soon(self.unload, instance, reason)
            with anyio.move_on_after(within_s):
                for instance in instances:
                    await instance.gone.wait()
            abandoned = [i for i in instances if not i.gone.is_set()]
            for instance in abandoned:
                self._abandon(instance, reason)
            unloads.cancel_scope.cancel()
        return [i.model_id for i in abandoned]

    def _abandon(self, instance: Instance, reason: DoneReason) -> None:
        logger.warning(
            "instance abandoned: its worker did not stop",
            model=instance.model_id,
            state=str(instance.state),
        )
        if instance.active is not None:
            instance.active.abandon(reason)
        if instance.disposal is not None:
            instance.disposal.cancel()  # its own finally forgets it again: idempotent
        self._forget(instance)  # now: shutdown reports it gone as it returns

    async def unload(
        self,
        instance: Instance,
        reason: DoneReason,
        *,
        eviction: bool = False,
        cause: str | None = None,
        for_model: str | None = None,
    ) -> None:
        """Unload ``instance``; its running generation ends with ``reason``.

        ``cause`` says why for the ``model_evicted`` event (``unload``, ``budget`` to make
        room ``for_model``, ``file_changed``, ``shutdown``; the reason when not given).
        """
        if instance.state is InstanceState.UNLOADING or instance.gone.is_set():
            await instance.gone.wait()
            return
        if instance.state is InstanceState.LOADING:
            await instance.settled.wait()
        if not instance.is_ready():  # the load failed: it disposed of itself
            return
        instance.transition(InstanceState.UNLOADING)
        if instance.active is not None:
            instance.active.cancel(reason)
        if eviction:
            instance.counters.evictions_total += 1
        self._events.publish(
            ModelEvicted(
                model=instance.model_id,
                reason=reason,
                cause=cause or str(reason),
                for_model=for_model,
            )
        )
        await self.dispose(instance)

    async def dispose(self, instance: Instance) -> None:
        """Close the engine on its own thread (after any running loop), free its charge.

        However the close ends (done, failed, or abandoned by :meth:`unload_all` through
        ``instance.disposal``), the instance leaves the table and the budget.
        """
        with anyio.CancelScope(shield=True) as disposal:
            instance.disposal = disposal
            try:
                await _close_engine(instance)
            except Exception as exc:
                logger.error("closing an instance failed", model=instance.model_id, error=repr(exc))
            finally:
                instance.disposal = None
                self._forget(instance)

    def _forget(self, instance: Instance) -> None:
        instance.engine = None
        instance.worker = None
        self._budget.release(instance.model_id)
        instance.charge_bytes = 0
        if self._instances.get(instance.model_id) is instance:
            del self._instances[instance.model_id]
        instance.gone.set()
        self._changes.notify()


async def _close_engine(instance: Instance) -> None:
    """``engine.close`` queued behind whatever the worker runs, then the thread's end."""
    engine, worker = instance.engine, instance.worker
    if worker is None:
        return
    try:
        if engine is not None:
            await worker.run(engine.close)
    finally:
        await worker.shutdown()
