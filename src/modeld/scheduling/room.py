"""Making room in the memory budget for an instance: evict least recently used idle
instances (the choice is :func:`~modeld.memory.budget.choose_victims`, a pure function),
or wait for busy ones to finish; and the signal that something changed.

Everything here runs on the event loop; state changes between awaits are atomic, so the
budget's check-and-charge needs no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable

import anyio

from modeld.engine.base import EngineClosed
from modeld.errors import MemoryBusy, ModelTooLarge
from modeld.memory.budget import Candidate, MemoryBudget, choose_victims
from modeld.scheduling.instance import Instance
from modeld.sizes import MIB
from modeld.types import InstanceState

__all__ = ["Changes", "MemoryRoom"]


class Changes:
    """Set at the next change (an instance ready or gone, a slot released)."""

    def __init__(self) -> None:
        self._event = anyio.Event()

    @property
    def event(self) -> anyio.Event:
        """The event the next :meth:`notify` sets (take it before checking state)."""
        return self._event

    async def wait(self, deadline_s: float | None) -> bool:
        """False when ``deadline_s`` (monotonic; None: never) passed first."""
        event = self._event
        timeout_s = math.inf if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        with anyio.move_on_after(timeout_s):
            await event.wait()
            return True
        return False

    def notify(self) -> None:
        self._event.set()
        self._event = anyio.Event()


class MemoryRoom:
    """Charges instances to ``budget``, evicting others through ``evict``."""

    def __init__(
        self,
        budget: MemoryBudget,
        changes: Changes,
        *,
        instances: Callable[[], list[Instance]],
        evict: Callable[[Instance, str], Awaitable[None]],
        process_bytes: Callable[[], int],
        retry_after_s: Callable[[int], float],
    ) -> None:
        self._budget = budget
        self._changes = changes
        self._instances = instances
        self._evict = evict  # (victim, for_model)
        self._process_bytes = process_bytes
        self._retry_after_s = retry_after_s

    async def reserve_embedding(self, instance: Instance, deadline_s: float) -> None:
        """Charge the instance's embedding context (on its first use) on top of what it
        holds, evicting or waiting as a load does; raises as :meth:`reserve`."""
        if instance.embedding_charged:
            return
        await self.reserve(instance, instance.embedding_bytes, deadline_s)
        instance.embedding_charged = True

    async def reserve(self, instance: Instance, need_bytes: int, deadline_s: float) -> None:
        """Charge ``need_bytes`` more to the instance, evicting LRU idle instances to make
        room.

        Raises :class:`ModelTooLarge` at once if it cannot fit an empty budget,
        :class:`MemoryBusy` if only busy instances stand in the way past the deadline,
        :class:`EngineClosed` if the instance is unloaded meanwhile.
        """
        model_id, budget = instance.model_id, self._budget
        held_bytes = budget.charge_of(model_id)
        process_bytes = self._process_bytes()  # never evicted
        if not budget.could_ever_fit(held_bytes + need_bytes + process_bytes):
            raise ModelTooLarge(
                f"{model_id} needs about {(held_bytes + need_bytes) / MIB:.0f} MiB; the budget "
                f"minus margin is {budget.limit_bytes / MIB:.0f} MiB"
                + (
                    f", {process_bytes / MIB:.0f} MiB of it the process's own"
                    if process_bytes
                    else ""
                )
            )
        while True:
            if instance.gone.is_set() or instance.state is InstanceState.UNLOADING:
                raise EngineClosed(f"{model_id} was unloaded while it waited for memory")
            others = {i.model_id: i for i in self._instances() if i is not instance}
            victims = choose_victims(
                (
                    Candidate(i.model_id, budget.charge_of(i.model_id), i.last_used_s, i.evictable)
                    for i in others.values()
                ),
                need_bytes,
                budget.used_bytes,
                budget.limit_bytes,
            )
            if victims == []:
                budget.charge(model_id, budget.charge_of(model_id) + need_bytes)
                instance.charge_bytes = budget.charge_of(model_id)
                return
            if victims:
                for victim in victims:
                    await self._evict(others[victim], model_id)
                continue
            if not await self._changes.wait(deadline_s):
                raise MemoryBusy(
                    f"{model_id} needs {need_bytes / MIB:.0f} MiB held by busy models",
                    self._retry_after_s(1),
                )
