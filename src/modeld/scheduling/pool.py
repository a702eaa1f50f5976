"""The instances: loading one on demand (once, however many wait), unloading, and the
table they live in. Room in the budget is :mod:`~modeld.scheduling.room`'s; the
per-model lines, counters and backoff are :mod:`~modeld.scheduling.lines`'.

Everything here runs on the event loop; state changes between awaits are atomic.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from typing import ParamSpec, TypeVar

import anyio
from anyio.abc import TaskGroup

from modeld.engine.base import TokenLoop
from modeld.errors import ModeldError, QueueTimeout, ShuttingDown
from modeld.events import EventHub, ModelFailed, ModelLoadStarted, ModelReady
from modeld.memory.budget import MemoryBudget
from modeld.memory.probe import MemoryProbe
from modeld.prompt_cache import PromptCache
from modeld.registry import ModelFile, Registry
from modeld.scheduling.clock import Clock, MonotonicClock
from modeld.scheduling.fifo import FifoSlot
from modeld.scheduling.file_check import replaced_file
from modeld.scheduling.file_guard import FileGuard
from modeld.scheduling.idle import IdleUnloader
from modeld.scheduling.instance import Instance
from modeld.scheduling.lines import ModelLines
from modeld.scheduling.loading import EngineFactory, Loader
from modeld.scheduling.room import Changes, MemoryRoom
from modeld.scheduling.threads import ThreadBudget
from modeld.scheduling.unloading import Unloader
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings
from modeld.statistics import InstanceStatistics
from modeld.types import DoneReason, InstanceState

__all__ = ["EngineFactory", "InstancePool"]

T = TypeVar("T")
P = ParamSpec("P")

_MEMORY_WAIT_LEAD_S = 0.05


class InstancePool:
    """Owns the instances; through its parts, the budget's room and the model lines."""

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
        self.changes = Changes()
        self._instances: dict[str, Instance] = {}
        self.threads = ThreadBudget(settings, self.all)
        self._loader = Loader(
            settings,
            events=events,
            token_loop=token_loop,
            probe=probe,
            budget=budget,
            gpu=gpu,
            engine_factory=engine_factory,
            prompt_cache=prompt_cache,
            threads=self.threads,
        )
        self.unloader = Unloader(self._instances, budget, events, self.changes)
        self.lines = ModelLines(lambda model_id: model_id in self._instances, self.idle.became_idle)
        self.room = MemoryRoom(
            budget,
            self.changes,
            instances=self.all,
            evict=self._evict,
            process_bytes=lambda: self._loader.process_bytes,
            retry_after_s=retry_after_s,
        )
        self._task_group: TaskGroup | None = None
        self._load_scopes: dict[str, anyio.CancelScope] = {}  # by model id
        self._closing = anyio.Event()  # set by close_loads: waiters for a load stop waiting
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

    def close_loads(self) -> None:
        """At shutdown: every running load (its probe child too) ends now, and whoever
        waits for one stops waiting (a load stuck in the kernel never settles)."""
        self._closing.set()
        for scope in self._load_scopes.values():
            scope.cancel()

    @property
    def guard(self) -> FileGuard:
        return self._loader.guard

    def first_use(self, instance: Instance, fn: Callable[P, T]) -> Callable[P, T]:
        """``fn`` inside a ``first_generation`` stage marker until the instance has
        started a generation (then ``fn`` itself): see :class:`FileGuard`."""
        if instance.generations_started:
            return fn
        model, guard = instance.model, self.guard

        def staged(*args: P.args, **kwargs: P.kwargs) -> T:
            return guard.staged(
                model.id, model.identity, "first_generation", lambda: fn(*args, **kwargs)
            )

        return staged

    def get(self, model_id: str) -> Instance | None:
        return self._instances.get(model_id)

    def all(self) -> list[Instance]:
        return list(self._instances.values())

    def slot_for(self, model_id: str) -> FifoSlot:
        return self.lines.slot_for(model_id)

    def statistics(self, now_s: float, now_unix: float) -> list[InstanceStatistics]:
        clock_now_s = self.idle.clock.now_s()
        loaded = [i.statistics(now_s, now_unix, clock_now_s) for i in self._instances.values()]
        cooling = self.lines.cooling_down(now_s)
        return sorted(loaded + cooling, key=lambda stats: stats.model_id)

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

    async def ready_instance(
        self, model: ModelFile, deadline_s: float, *, check_file: bool = True
    ) -> Instance:
        """A ready instance of ``model``, loading it (once, however many wait) if needed.

        A ready one's file is looked up again (a replaced file is loaded anew) unless
        ``check_file`` is False and ``model`` is the loaded file: the caller's work then
        checks it on the model's worker (:mod:`~modeld.scheduling.file_check`).

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
                if check_file or model.identity != instance.model.identity:
                    current = await replaced_file(self.registry, self.unloader, instance)
                    if current is not None:
                        model = current  # loaded again from the file as it is now
                        continue
                if not instance.is_ready():  # unloaded while the file was looked at
                    continue
                return instance
            with anyio.move_on_after(max(0.0, deadline_s - time.monotonic())) as scope:
                await _first_of(instance.settled, self._closing)  # a stuck load never settles
            if self._closing.is_set() and not instance.settled.is_set():
                raise ShuttingDown("modeld is shutting down")  # the load may never end
            if scope.cancelled_caught and not instance.settled.is_set():
                raise QueueTimeout(f"{model.id}: still loading after the request's max wait", 1.0)
            if instance.state is InstanceState.ERROR:
                assert instance.error is not None
                raise instance.error

    def loaded_file(self, model_id: str) -> ModelFile | None:
        """The file of ``model_id``'s ready instance (None: none is ready): the request
        need not look it up before its turn: it is checked then (:meth:`ready_instance`,
        or the request's first step on the worker)."""
        instance = self._instances.get(model_id)
        return instance.model if instance is not None and instance.is_ready() else None

    def _begin_load(self, model: ModelFile, deadline_s: float) -> Instance:
        counters = self.lines.counters_for(model.id)  # raises during a backoff
        now_s = time.monotonic()
        instance = Instance(
            model=model,
            counters=counters,
            slot=self.slot_for(model.id),
            last_used_s=now_s,
            loading_since_s=now_s,
            keep_alive_s=self.idle.keep_alive_s(model.id, None),
            pinned=self.settings.resolve(model.id).pin,
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
        scope = self._load_scopes[instance.model_id] = anyio.CancelScope()
        try:
            with scope:
                await self._loader.load(
                    instance, lambda i, need_bytes: self.room.reserve(i, need_bytes, deadline_s)
                )
        except ModeldError as exc:
            if self.accepting:
                self.lines.load_failed(instance.counters, exc)
                await self._end_load(instance, exc)
            else:  # ended by shutdown: nothing is wrong with the file
                await self._end_load(instance, ShuttingDown("modeld is shutting down"))
        else:
            if scope.cancel_called:
                await self._end_load(instance, ShuttingDown("modeld is shutting down"))
                return
            instance.transition(InstanceState.READY)
            instance.ready_at_s = time.monotonic()
            instance.idle_since_s = self.idle.clock.now_s()
            self.lines.loaded_ok(instance.counters)
            load_ms = round((time.monotonic() - started_s) * 1000)
            self.events.publish(ModelReady(model=instance.model_id, load_ms=load_ms))
        finally:
            self._load_scopes.pop(instance.model_id, None)
            instance.settled.set()
            self.changes.notify()

    async def _end_load(self, instance: Instance, error: ModeldError) -> None:
        """The load ended without an engine: its waiters get ``error`` (a shutdown's is
        no failure of the file: not published as one)."""
        instance.error = error
        instance.transition(InstanceState.ERROR)
        if not isinstance(error, ShuttingDown):
            self.events.publish(ModelFailed(model=instance.model_id, error=error.message))
        await self.unloader.dispose(instance)

    async def _evict(self, victim: Instance, for_model: str) -> None:
        await self.unloader.unload(
            victim, DoneReason.EVICTED, eviction=True, cause="budget", for_model=for_model
        )


async def _first_of(*events: anyio.Event) -> None:
    """Until the first of ``events`` is set."""
    async with anyio.create_task_group() as waits:

        async def first(event: anyio.Event) -> None:
            await event.wait()
            waits.cancel_scope.cancel()

        for event in events:
            waits.start_soon(first, event)
