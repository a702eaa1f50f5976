"""Admission and deadlines: the caps a request must pass at once, its place in the
model's line, and the wait (bounded by ``--max-wait-ms`` and ``--infer-timeout``) for
its turn and a ready instance.

Everything here runs on the event loop. Cancelled at any await, nothing is left behind:
no admission, no place in the line, no held slot.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio

from modeld.errors import InferTimeout, QueueFull, QueueTimeout, ShuttingDown, TooManyInflight
from modeld.scheduling.fifo import SlotTicket
from modeld.scheduling.generation import RequestTiming
from modeld.scheduling.instance import Instance
from modeld.scheduling.pool import InstancePool
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings

__all__ = ["Admission", "Launch"]

T = TypeVar("T")
# Starts the work on a ready instance; None: the instance went away meanwhile.
Launch = Callable[[Instance, RequestTiming], Awaitable[T | None]]


class Admission:
    """Counts what is admitted and keeps the recent mean generation time, from which a
    refused request's ``Retry-After`` is estimated."""

    def __init__(self, settings: LiveSettings, pool: InstancePool) -> None:
        self._live = settings
        self._pool = pool
        self.admitted = 0
        self._generation_s_ewma = 1.0

    @property
    def settings(self) -> Settings:
        return self._live.current

    @asynccontextmanager
    async def admit(self, model_id: str) -> AsyncIterator[SlotTicket]:
        """A place in ``model_id``'s line, held for the block (and released, whoever holds
        the slot by then, at its end: a no-op once the work released it).

        Raises at once, before anything is held: :class:`ShuttingDown`,
        :class:`TooManyInflight` past ``--max-inflight``, :class:`QueueFull` past
        ``--max-queue-depth``.
        """
        ticket = self._join(model_id)
        try:
            yield ticket
        finally:
            ticket.release()  # idempotent
            self.admitted -= 1
            self._pool.lines.forget_slot_if_unused(model_id)

    def _join(self, model_id: str) -> SlotTicket:
        """Refuse at once past a cap; otherwise join the model's line (no await)."""
        if not self._pool.accepting:
            raise ShuttingDown("modeld is shutting down")
        cap = self.settings.max_inflight
        if cap is not None and self.admitted >= cap:
            raise TooManyInflight(
                f"{self.admitted} requests in flight (cap {cap})", self.retry_after_s(cap)
            )
        slot = self._pool.slot_for(model_id)
        depth = self.settings.max_queue_depth
        if slot.busy and slot.queue_len >= depth:
            raise QueueFull(
                f"{model_id}: {slot.queue_len} requests queued (depth {depth})",
                self.retry_after_s(slot.queue_len),
            )
        self.admitted += 1
        return slot.join()

    def retry_after_s(self, ahead: int) -> float:
        """Requests ahead times the recent mean generation time, at least a second."""
        return float(max(1, math.ceil(ahead * self._generation_s_ewma)))

    def generation_took(self, seconds: float) -> None:
        self._generation_s_ewma = 0.8 * self._generation_s_ewma + 0.2 * seconds

    async def start(
        self, model_id: str, ticket: SlotTicket, launch: Launch[T], *, launch_checks_file: bool
    ) -> T:
        """Wait for the ticket's turn and a ready instance, then ``launch`` on it (None:
        the instance went away meanwhile; it is loaded again, still first in line).
        ``launch_checks_file``: ``launch`` checks a loaded model's file itself, on the
        model's worker (see :meth:`InstancePool.ready_instance`).

        Raises :class:`QueueTimeout` past ``--max-wait-ms``, :class:`InferTimeout` past
        an earlier ``--infer-timeout``, and what the lookup, the load and ``launch``
        raise. On any exit by exception the ticket is released.
        """
        timing = RequestTiming()
        deadline_s = timing.admitted_s + self.settings.max_wait_ms / 1000
        timeout = self.settings.infer_timeout
        if timeout is not None and timing.admitted_s + timeout < deadline_s:
            deadline_s = timing.admitted_s + timeout
            try:
                with anyio.fail_after(max(0.0, deadline_s - time.monotonic())):
                    # the inner deadline only bounds the load's memory wait; this scope,
                    # a moment earlier, is the one that fires
                    inner_deadline_s = deadline_s + 1.0
                    return await self._start_within(
                        model_id, ticket, timing, inner_deadline_s, launch, launch_checks_file
                    )
            except TimeoutError:
                raise InferTimeout(
                    f"{model_id}: not started within --infer-timeout ({timeout:g} s)"
                ) from None
        return await self._start_within(
            model_id, ticket, timing, deadline_s, launch, launch_checks_file
        )

    async def _start_within(
        self,
        model_id: str,
        ticket: SlotTicket,
        timing: RequestTiming,
        deadline_s: float,
        launch: Launch[T],
        launch_checks_file: bool,
    ) -> T:
        # The ticket keeps the request's place in the model's line from admission on,
        # across the file lookup and the load: the order of arrival is the order of
        # service, whatever happens to the instance meanwhile.
        try:
            # an unknown model: 404 at once; a loaded one's file is checked once, when ready
            model = self._pool.loaded_file(model_id) or await self._pool.registry.lookup(model_id)
            try:
                await ticket.wait(max(0.0, deadline_s - time.monotonic()))
            except TimeoutError:
                queue_len = self._pool.slot_for(model_id).queue_len
                raise QueueTimeout(
                    f"{model_id}: waited {self.settings.max_wait_ms} ms in the queue",
                    self.retry_after_s(queue_len + 1),
                ) from None
            while True:
                load_started_s = time.monotonic()
                instance = await self._pool.ready_instance(
                    model, deadline_s, check_file=not launch_checks_file
                )
                timing.load_s += time.monotonic() - load_started_s
                timing.deadline_s = deadline_s
                launched = await launch(instance, timing)
                if launched is not None:
                    return launched
                # unloaded between the load and the launch (or for a file replaced under
                # it): load it again, still first, from the file as it is now
                model = self._pool.loaded_file(model_id) or await self._pool.registry.lookup(
                    model_id
                )
        except BaseException:
            ticket.release()
            raise
