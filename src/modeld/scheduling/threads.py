"""The thread budget: llama.cpp's threads across all loaded models stay within the cores.

llama.cpp's CPU backend synchronises its threads with OpenMP barriers, hundreds per
decode step. libgomp spins at a barrier only while the process's OpenMP threads (1 plus
the extra threads of each pool) do not outnumber the cores; past that nearly every
barrier of every model is a futex sleep and wake (a fifth to a quarter of Gemma's decode
speed on 2 cores). libgomp keeps a pool per thread that starts a parallel region, and
each instance runs on its own worker thread, so every model that ran with 2 or more
threads keeps a pool.

So each piece of work that runs llama.cpp's graph (a generation, an embedding batch, the
warm-up) first takes a *lease* of threads: the model's threads (the cores, unless
``threads`` is set), fewer when other work is running at the same moment (at least 1);
work already running is retuned to its new share, and back when the others end.
Before it runs, idle instances whose pools would take the process past the cores free
them (:func:`~modeld.engine.openmp.release_pool`, queued on their own worker ahead of
anything else they run), so ``1 + sum(pool - 1) <= cores`` holds whenever work starts.
A model whose ``threads`` is set gets them whatever runs, with a warning when that
oversubscribes the cores.

Everything here runs on the event loop; a lease is taken and returned without awaiting.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from loguru import logger

from modeld.engine.cpu_cores import usable_cores
from modeld.settings.live import LiveSettings

if TYPE_CHECKING:
    from modeld.engine.contract import Engine
    from modeld.scheduling.instance import Instance

__all__ = ["ThreadBudget", "ThreadShare"]

P = ParamSpec("P")
T = TypeVar("T")


@dataclass
class ThreadShare:
    """One instance's part of the budget, as ``/status`` shows it."""

    configured: int = 0  # the threads it asks for (its setting, else the cores)
    lease: int = 0  # threads of the work it runs now; 0 while it runs none
    pool: int = 1  # the OpenMP team its worker keeps between work (1: no pool)
    pinned: bool = False  # its threads are set: it gets them whatever runs
    started: int = 0  # the order its running work began in (the earlier keeps more)

    @property
    def extra(self) -> int:
        """The OpenMP threads it adds to the process beyond its worker."""
        return self.pool - 1

    def run_on(self, threads: int) -> None:
        self.lease = threads
        if threads > 1:
            self.pool = threads  # a team of n leaves a pool of n (grown or shrunk)


class ThreadBudget:
    """Leases threads to the work of ``instances()`` within ``cores`` (default: the
    process's usable cores, see :func:`~modeld.engine.cpu_cores.usable_cores`)."""

    def __init__(
        self,
        settings: LiveSettings,
        instances: Callable[[], list[Instance]],
        cores: int | None = None,
    ) -> None:
        self._live = settings
        self._instances = instances
        self.cores = cores or usable_cores()
        self.pools_released = 0  # how many idle pools were freed to make room
        self._warned: set[str] = set()  # models whose leases oversubscribe, told once
        self._started = 0

    def lease(self, instance: Instance) -> int:
        """The threads ``instance``'s next work runs on (apply them on its worker,
        before it); call :meth:`give_back` when it has ended. Work already running is
        retuned to its new share; pool releases that make room are queued on idle
        instances' workers (and on ``instance``'s own, ahead of its work, when it runs
        on 1 thread but keeps a larger pool)."""
        share = instance.threads
        settings = self._live.current
        share.pinned = settings.threads_pinned(instance.model_id)
        share.configured = (
            settings.resolve(instance.model_id).threads if share.pinned else self.cores
        )
        self._started += 1
        share.started = self._started
        share.lease = 1  # running: counted in the share-out below
        self._share_cores(starting=instance)
        self._fit(starting=instance)
        busy = sum(i.threads.lease for i in self._instances())
        if busy <= self.cores and self._managed() <= self.cores:
            self._warned.discard(instance.model_id)
        elif instance.model_id not in self._warned:  # once, until it fits again
            self._warned.add(instance.model_id)
            logger.warning(
                "threads oversubscribe the cores: set threads lower for some models",
                model=instance.model_id,
                threads=share.lease,
                cores=self.cores,
                running_threads=busy,
                openmp_threads=self._managed(),
            )
        return share.lease

    def leased(self, instance: Instance, engine: Engine, fn: Callable[P, T]) -> Callable[P, T]:
        """``fn`` on the threads leased now (:meth:`lease`), set on the worker first;
        the caller gives them back when the call has ended."""
        threads = self.lease(instance)

        def on_threads(*args: P.args, **kwargs: P.kwargs) -> T:
            engine.threads.use(threads)
            return fn(*args, **kwargs)

        return on_threads

    def give_back(self, instance: Instance) -> None:
        """``instance``'s leased work has ended: work still running gets its cores
        (its pool stays until someone needs the room)."""
        instance.threads.lease = 0
        self._share_cores(starting=None)
        self._fit(starting=None)

    def _share_cores(self, starting: Instance | None) -> None:
        """Running work with set threads gets them; the rest share what is left, at
        least 1 each, the earlier started taking a remainder. Running work other than
        ``starting`` is retuned from here (it is mid-generation on its worker)."""
        running = sorted(
            (i for i in self._instances() if i.threads.lease), key=lambda i: i.threads.started
        )
        shared = [i for i in running if not i.threads.pinned]
        room = self.cores - sum(i.threads.configured for i in running if i.threads.pinned)
        for holder in running:
            share = holder.threads
            threads = share.configured
            if not share.pinned:
                place = shared.index(holder)
                fair = room // len(shared) + (1 if place < room % len(shared) else 0)
                threads = max(1, min(share.configured, fair))
            if holder is starting:
                share.run_on(threads)
            elif threads != share.lease:
                share.run_on(threads)
                if holder.engine is not None:
                    holder.engine.threads.retune(threads)

    def _fit(self, starting: Instance | None) -> None:
        """Free idle pools, the longest unused first, until ``1 + sum(pool - 1)`` is
        within the cores; last, ``starting``'s own when it runs on 1 thread."""
        idle = sorted(
            (i for i in self._instances() if not i.threads.lease and i.threads.pool > 1),
            key=lambda i: i.last_used_s,
        )
        if starting is not None and starting.threads.lease == 1 and starting.threads.pool > 1:
            idle.append(starting)  # freed on its worker before its work
        for holder in idle:
            if self._managed() <= self.cores:
                break
            self._release(holder)

    def _managed(self) -> int:
        """The process's OpenMP threads as libgomp counts them (1 + each pool's extra)."""
        return 1 + sum(i.threads.extra for i in self._instances())

    def _release(self, instance: Instance) -> None:
        """Free ``instance``'s pool on its worker, ahead of anything queued after it."""
        engine, worker = instance.engine, instance.worker
        instance.threads.pool = 1
        self.pools_released += 1
        if engine is None or worker is None:
            return  # its worker thread is gone, and its pool with it
        worker.submit(engine.threads.release_pool)  # a stopped worker ends it unrun: no pool
