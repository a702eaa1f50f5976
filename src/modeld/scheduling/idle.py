"""Idle unload: how long each instance may stay loaded with nothing to do, and the watch
that unloads it when that time has run out.

An instance's keep-alive is set by every use (the request's ``keep_alive``, else the
model's or ``--keep-alive``); it counts down from the moment the instance becomes idle:
ready, nothing running, nothing queued, and not pinned. A busy, queued or pinned
instance never expires. Time is the injected :class:`~modeld.scheduling.clock.Clock`.

An instance that becomes idle also keeps its context's prefix in the prompt cache
(:func:`keep_prefix`): idle time is when that copy costs no request anything.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import anyio

from modeld.registry import check_model_id
from modeld.scheduling.clock import Clock
from modeld.scheduling.instance import Instance
from modeld.settings.keep_alive import keep_alive_seconds
from modeld.types import DoneReason

if TYPE_CHECKING:
    from modeld.scheduling.pool import InstancePool

__all__ = ["KEEP_AFTER_IDLE_S", "IdleUnloader", "keep_prefix"]

# An idle model copies its prefix into the prompt cache this long after its slot went idle.
KEEP_AFTER_IDLE_S = 0.05


class IdleUnloader:
    """The keep-alive of a pool's instances, on ``clock``."""

    def __init__(self, pool: InstancePool, clock: Clock) -> None:
        self._pool = pool
        self.clock = clock

    def keep_alive_s(self, model_id: str, requested: str | float | None) -> float:
        """Seconds for a use of ``model_id`` that asked for ``requested``; None: the
        model's own ``keep_alive`` (its ``[models."<id>"]`` table), else ``--keep-alive``.
        ``math.inf`` for never."""
        if requested is None:
            requested = self._pool.settings.resolve(model_id).keep_alive
        return keep_alive_seconds(requested)

    def used(self, instance: Instance, requested: str | float | None) -> None:
        """A request runs on ``instance``: the last use decides how long it stays
        loaded after it."""
        instance.keep_alive_s = self.keep_alive_s(instance.model_id, requested)

    def touched(self, instance: Instance) -> None:
        """A use that holds no slot (a load, a pin): the countdown starts again."""
        instance.idle_since_s = self.clock.now_s()
        self._pool.changes.notify()

    def became_idle(self, model_id: str) -> None:
        """The model's slot was released with nobody waiting: its countdown starts, and
        its context's prefix goes into the prompt cache meanwhile (:func:`keep_prefix`)."""
        instance = self._pool.get(model_id)
        if instance is not None:
            instance.idle_since_s = self.clock.now_s()
            if instance.engine is not None and instance.engine.cache_tier.worth_keeping():
                self._pool.start_soon(keep_prefix, instance)
        self._pool.changes.notify()

    async def expire(self, model_id: str) -> None:
        """Keep-alive 0 for a loaded model: unloaded now if it is idle, otherwise as soon
        as its running and queued requests are done (none is cancelled); a pinned one
        stays. Raises :class:`InvalidModelId` for unsafe ids; a model that is not loaded
        is left as it is."""
        instance = self._pool.get(check_model_id(model_id))
        if instance is not None:
            instance.keep_alive_s = 0.0
            await self._unload_if_expired(instance)

    async def run(self) -> None:
        """Unload each instance whose keep-alive has run out, until cancelled.

        Wakes at the next expiry or when anything changes (a request finishes, a load
        ends, an instance goes). Each unload re-checks and moves the instance to
        ``unloading`` in one step, so a request that joined the line first keeps it.
        """
        while True:
            changed = self._pool.changes.event
            now_s = self.clock.now_s()
            next_s = math.inf
            for instance in self._pool.all():
                expires_s = instance.expires_at_s()
                if expires_s is not None and expires_s <= now_s:
                    self._pool.start_soon(self._unload_if_expired, instance)
                elif expires_s is not None:
                    next_s = min(next_s, expires_s)
            with self.clock.cancel_at(next_s):
                await changed.wait()

    async def _unload_if_expired(self, instance: Instance) -> None:
        expires_s = instance.expires_at_s()
        if expires_s is not None and expires_s <= self.clock.now_s():
            await self._pool.unloader.unload(instance, DoneReason.IDLE, cause="idle")


async def keep_prefix(instance: Instance) -> None:
    """Have the idle ``instance``'s worker copy its context's prefix into the prompt
    cache's memory tier, off any request's path: the turn of another conversation that
    displaces it later then pays only its own restore, not this save as well.

    The copy waits :data:`KEEP_AFTER_IDLE_S` first, so that it never competes with the
    answer's last bytes for the GIL and a client that sends its next request at once
    (it finds its prefix live) never waits for it. A request that comes before the copy
    starts skips it (the slot is busy again); one that comes during it waits for it (a
    copy of the state: ~0.4-0.5 ms per MiB on the development host).
    """
    await anyio.sleep(KEEP_AFTER_IDLE_S)
    engine, worker, slot = instance.engine, instance.worker, instance.slot
    if engine is None or worker is None or not instance.is_ready() or not slot.idle:
        return
    tier = engine.cache_tier
    worker.submit(lambda: tier.keep_idle(lambda: slot.idle))
