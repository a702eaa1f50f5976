"""The instances: loading inside the budget, LRU eviction, unloading, per-model queues.

Everything here runs on the event loop; state changes between awaits are atomic, so the
budget's check-and-charge needs no lock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Coroutine
from typing import TypeVar

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from modeld.config import Settings
from modeld.engine.base import EngineClosed, TokenLoop
from modeld.errors import (
    InvalidModelId,
    MemoryBusy,
    ModelCoolingDown,
    ModeldError,
    ModelNotFound,
    ModelTooLarge,
    QueueTimeout,
    ResourcesExhausted,
    ShuttingDown,
)
from modeld.live_settings import LiveSettings
from modeld.memory.budget import Candidate, MemoryBudget, choose_victims
from modeld.memory.probe import MemoryProbe
from modeld.prompt_cache import PromptCache
from modeld.registry import ModelFile, Registry, check_model_id
from modeld.scheduling.clock import Clock, MonotonicClock
from modeld.scheduling.events import (
    EventHub,
    ModelEvicted,
    ModelFailed,
    ModelLoadStarted,
    ModelReady,
)
from modeld.scheduling.fifo import FifoSlot
from modeld.scheduling.file_guard import FileGuard
from modeld.scheduling.idle import IdleUnloader
from modeld.scheduling.instance import Instance, InstanceStatistics, ModelCounters
from modeld.scheduling.loading import EngineFactory, Loader
from modeld.sizes import MIB
from modeld.types import DoneReason, InstanceState

__all__ = ["EngineFactory", "InstancePool"]

T = TypeVar("T")

_MEMORY_WAIT_LEAD_S = 0.05
_BACKOFF_BASE_S = 1.0
_BACKOFF_MAX_S = 60.0


class InstancePool:
    """Owns the budget, the instances, their counters and the per-model FIFO slots."""

    def __init__(
        self,
        settings: LiveSettings,
        *,
        registry: Registry,
        events: EventHub,
        token_loop: TokenLoop,
        probe: MemoryProbe,
        budget: MemoryBudget,
        gpu: bool,
        retry_after_s: Callable[[int], float],
        engine_factory: EngineFactory | None = None,
        clock: Clock | None = None,
        prompt_cache: PromptCache | None = None,
    ) -> None:
        self._live = settings
        self.idle = IdleUnloader(self, clock or MonotonicClock())
        self.registry = registry
        self.events = events
        self.budget = budget
        self._retry_after_s = retry_after_s
        self._loader = Loader(
            settings,
            events=events,
            token_loop=token_loop,
            probe=probe,
            budget=budget,
            gpu=gpu,
            engine_factory=engine_factory,
            prompt_cache=prompt_cache,
        )
        self._instances: dict[str, Instance] = {}
        self._slots: dict[str, FifoSlot] = {}
        self.counters: dict[str, ModelCounters] = {}
        self._memory_changed = anyio.Event()
        self._task_group: TaskGroup | None = None
        self.accepting = True

    @property
    def settings(self) -> Settings:
        return self._live.current

    def start(self, task_group: TaskGroup) -> None:
        """Loads run in the owner's task group, so a waiter leaving never cancels one;
        so does the keep-alive watch, for the owner's life."""
        self._task_group = task_group
        task_group.start_soon(self.idle.run, name="keep-alive")

    def start_soon(
        self, work: Callable[[Instance], Coroutine[object, object, None]], instance: Instance
    ) -> None:
        """Work on an instance in the owner's task group: it outlives whoever asked."""
        assert self._task_group is not None, "use ModelManager as an async context manager"
        self._task_group.start_soon(work, instance)

    @property
    def guard(self) -> FileGuard:
        return self._loader.guard

    def first_use(self, instance: Instance, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn`` inside a ``first_generation`` stage marker until the instance has
        started a generation (then ``fn`` itself): see :class:`FileGuard`."""
        if instance.generations_started:
            return fn
        model = instance.model
        return lambda: self.guard.staged(model.id, model.identity, "first_generation", fn)

    def get(self, model_id: str) -> Instance | None:
        return self._instances.get(model_id)

    def all(self) -> list[Instance]:
        return list(self._instances.values())

    def slot_for(self, model_id: str) -> FifoSlot:
        """One FIFO per model, outliving its instances."""
        slot = self._slots.get(model_id)
        if slot is None:
            slot = self._slots[model_id] = FifoSlot(on_idle=lambda: self.idle.became_idle(model_id))
        return slot

    def forget_slot_if_unused(self, model_id: str) -> None:
        """Drop an idle line for a model that has never been loaded (an id that turned
        out unknown): ids a client makes up must not grow the table."""
        slot = self._slots.get(model_id)
        unknown = model_id not in self._instances and model_id not in self.counters
        if slot is not None and slot.idle and unknown:
            del self._slots[model_id]

    def statistics(self, now_s: float, now_unix: float) -> list[InstanceStatistics]:
        clock_now_s = self.idle.clock.now_s()
        loaded = [i.statistics(now_s, now_unix, clock_now_s) for i in self._instances.values()]
        return sorted(loaded + self._cooling_down(now_s), key=lambda stats: stats.model_id)

    def snapshot(self, instance: Instance) -> InstanceStatistics:
        return instance.statistics(time.monotonic(), time.time(), self.idle.clock.now_s())

    def stalled_loads(self) -> list[str]:
        """Models whose load has run past ``--load-timeout``: the watchdog's signal."""
        limit_s = time.monotonic() - self.settings.load_timeout
        return [
            i.model_id
            for i in self._instances.values()
            if i.state is InstanceState.LOADING and i.loading_since_s < limit_s
        ]

    async def load(
        self, model_id: str, *, pin: bool | None = None, keep_alive: str | float | None = None
    ) -> Instance:
        """Load (and warm) a model now, or refresh its keep-alive if it is loaded;
        optionally pin it against eviction (and idle unload), or set its keep-alive."""
        model = await self.registry.lookup(model_id)
        deadline_s = time.monotonic() + self.settings.load_timeout
        instance = await self.ready_instance(model, deadline_s)
        if pin is not None:
            instance.pinned = pin
        self.idle.used(instance, keep_alive)
        self.idle.touched(instance)
        return instance

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
            instance.disposal.cancel()  # its bookkeeping runs in its own finally
        else:
            self._forget(instance)

    def _cooling_down(self, now_s: float) -> list[InstanceStatistics]:
        """Models with no instance whose last load failed: shown as ``error`` with the
        error and the time left before a retry, so the cooldown is visible."""
        return [
            InstanceStatistics(
                model_id=model_id,
                state=InstanceState.ERROR,
                last_used_unix=0.0,
                est_vram_mb=0.0,
                measured=False,
                queue_len=self.slot_for(model_id).queue_len,
                inflight=0,
                loads_total=counters.loads_total,
                evictions_total=counters.evictions_total,
                last_error=counters.last_error,
                uptime_seconds=0.0,
                pinned=False,
                retry_in_seconds=round(counters.retry_at_s - now_s, 3),
            )
            for model_id, counters in self.counters.items()
            if model_id not in self._instances and counters.retry_at_s > now_s
        ]

    async def ready_instance(self, model: ModelFile, deadline_s: float) -> Instance:
        """A ready instance of ``model``, loading it (once, however many wait) if needed.

        Raises the load's own error (:class:`ModelInvalid`, :class:`ModelTooLarge`,
        :class:`MemoryBusy`, ...), :class:`ModelCoolingDown` during a failed load's backoff,
        :class:`QueueTimeout` past ``deadline_s``, :class:`ShuttingDown`. Cancelling the
        wait does not cancel the load: other requests may be waiting for it.
        """
        while True:
            if not self.accepting:
                raise ShuttingDown("modeld is shutting down")
            instance = self._instances.get(model.id)
            if instance is None:
                instance = self._begin_load(model, deadline_s)
            if instance.state is InstanceState.UNLOADING:
                await instance.gone.wait()
                continue
            if instance.state is InstanceState.READY:
                if await self._file_changed(instance):
                    await self.unload(instance, DoneReason.EVICTED, cause="file_changed")
                    continue
                if not instance.is_ready():  # unloaded while the file was looked at
                    continue
                return instance
            with anyio.move_on_after(max(0.0, deadline_s - time.monotonic())) as scope:
                await instance.settled.wait()
            if scope.cancelled_caught and not instance.settled.is_set():
                raise QueueTimeout(f"{model.id}: still loading after the request's max wait", 1.0)
            if instance.state is InstanceState.ERROR:
                assert instance.error is not None
                raise instance.error

    async def _file_changed(self, instance: Instance) -> bool:
        """A file rewritten in place under a loaded (mmapped) model must not be used.

        Raises :class:`ModelsDirUnavailable` when the models dir does not answer.
        """
        try:
            current = await self.registry.lookup(instance.model_id)
        except (ModelNotFound, InvalidModelId):
            return True
        return current.identity != instance.model.identity

    def _begin_load(self, model: ModelFile, deadline_s: float) -> Instance:
        counters = self.counters.setdefault(model.id, ModelCounters())
        now_s = time.monotonic()
        if counters.retry_at_s > now_s:
            raise ModelCoolingDown(
                f"{model.id}: loading failed ({counters.last_error}); retrying is allowed in "
                f"{counters.retry_at_s - now_s:.1f} s",
                retry_after_s=math.ceil(counters.retry_at_s - now_s),
            )
        instance = Instance(
            model=model,
            counters=counters,
            slot=self.slot_for(model.id),
            last_used_s=now_s,
            loading_since_s=now_s,
            keep_alive_s=self.idle.keep_alive_s(model.id, None),
            pinned=self.settings.model(model.id).pin,
        )
        self._instances[model.id] = instance
        assert self._task_group is not None, "use ModelManager as an async context manager"
        # The load's wait for memory ends a moment before the request's own deadline, so a
        # request that waited for busy models is told memory_busy (503), not queue_timeout.
        load_deadline_s = deadline_s - _MEMORY_WAIT_LEAD_S
        self._task_group.start_soon(self._load, instance, load_deadline_s, name=f"load {model.id}")
        return instance

    async def _load(self, instance: Instance, deadline_s: float) -> None:
        started_s = time.monotonic()
        self.events.publish(ModelLoadStarted(model=instance.model_id))
        try:
            await self._loader.load(
                instance, lambda i, need_bytes: self._reserve(i, need_bytes, deadline_s)
            )
        except ModeldError as exc:
            await self._fail_load(instance, exc)
        else:
            instance.transition(InstanceState.READY)
            instance.ready_at_s = time.monotonic()
            instance.idle_since_s = self.idle.clock.now_s()
            counters = instance.counters
            counters.loads_total += 1
            counters.consecutive_failures = 0
            counters.retry_at_s = 0.0
            load_ms = round((time.monotonic() - started_s) * 1000)
            self.events.publish(ModelReady(model=instance.model_id, load_ms=load_ms))
        finally:
            instance.settled.set()
            self.notify_changed()

    async def _fail_load(self, instance: Instance, error: ModeldError) -> None:
        counters = instance.counters
        counters.load_failures_total += 1
        counters.last_error = error.message
        if not isinstance(error, MemoryBusy | QueueTimeout | ResourcesExhausted):
            counters.consecutive_failures += 1
            backoff_s = min(
                _BACKOFF_MAX_S, _BACKOFF_BASE_S * 2 ** (counters.consecutive_failures - 1)
            )
            counters.retry_at_s = time.monotonic() + backoff_s
        instance.error = error
        instance.transition(InstanceState.ERROR)
        self.events.publish(ModelFailed(model=instance.model_id, error=error.message))
        await self._dispose(instance)

    async def reserve_embedding(self, instance: Instance, deadline_s: float) -> None:
        """Charge the instance's embedding context (on its first use) on top of what it
        holds, evicting or waiting as a load does; raises as :meth:`_reserve`."""
        if instance.embedding_charged:
            return
        await self._reserve(instance, instance.embedding_bytes, deadline_s)
        instance.embedding_charged = True

    async def _reserve(self, instance: Instance, need_bytes: int, deadline_s: float) -> None:
        """Charge ``need_bytes`` more to the instance, evicting LRU idle instances to make
        room.

        Raises :class:`ModelTooLarge` at once if it cannot fit an empty budget, and
        :class:`MemoryBusy` if only busy instances stand in the way past the deadline.
        """
        model_id = instance.model_id
        held_bytes = self.budget.charge_of(model_id)
        process_bytes = self._loader.process_bytes  # never evicted
        if not self.budget.could_ever_fit(held_bytes + need_bytes + process_bytes):
            raise ModelTooLarge(
                f"{model_id} needs about {(held_bytes + need_bytes) / MIB:.0f} MiB; the budget "
                f"minus margin is {self.budget.limit_bytes / MIB:.0f} MiB"
                + (
                    f", {process_bytes / MIB:.0f} MiB of it the process's own"
                    if process_bytes
                    else ""
                )
            )
        while True:
            if instance.gone.is_set() or instance.state is InstanceState.UNLOADING:
                raise EngineClosed(f"{model_id} was unloaded while it waited for memory")
            others = [i for i in self._instances.values() if i is not instance]
            victims = choose_victims(
                (
                    Candidate(
                        i.model_id, self.budget.charge_of(i.model_id), i.last_used_s, i.evictable
                    )
                    for i in others
                ),
                need_bytes,
                self.budget.used_bytes,
                self.budget.limit_bytes,
            )
            if victims == []:
                self.budget.charge(model_id, self.budget.charge_of(model_id) + need_bytes)
                instance.charge_bytes = self.budget.charge_of(model_id)
                return
            if victims:
                for victim in victims:
                    await self.unload(
                        self._instances[victim],
                        DoneReason.EVICTED,
                        eviction=True,
                        cause="budget",
                        for_model=model_id,
                    )
                continue
            if not await self.wait_changed(deadline_s):
                raise MemoryBusy(
                    f"{model_id} needs {need_bytes / MIB:.0f} MiB held by busy models",
                    self._retry_after_s(1),
                )

    @property
    def changed(self) -> anyio.Event:
        """Set at the next change (an instance ready or gone, a slot released)."""
        return self._memory_changed

    async def wait_changed(self, deadline_s: float | None) -> bool:
        event = self._memory_changed
        timeout_s = math.inf if deadline_s is None else max(0.0, deadline_s - time.monotonic())
        with anyio.move_on_after(timeout_s):
            await event.wait()
            return True
        return False

    def notify_changed(self) -> None:
        self._memory_changed.set()
        self._memory_changed = anyio.Event()

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
        self.events.publish(
            ModelEvicted(
                model=instance.model_id,
                reason=reason,
                cause=cause or str(reason),
                for_model=for_model,
            )
        )
        await self._dispose(instance)

    async def _dispose(self, instance: Instance) -> None:
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
        self.budget.release(instance.model_id)
        instance.charge_bytes = 0
        if self._instances.get(instance.model_id) is instance:
            del self._instances[instance.model_id]
        instance.gone.set()
        self.notify_changed()


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
