"""``ModelManager``: the scheduler behind every request, usable without HTTP.

A façade over its parts, read in the order a request meets them: admission and
deadlines (:mod:`~modeld.scheduling.admission`), the instance (:mod:`.pool`: loaded on
demand inside the budget, :mod:`.room` evicting LRU idle ones), the FIFO slot
(:mod:`.lines`), the hand-over to the worker and the release (:mod:`.launching`).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import TracebackType
from typing import Self

import anyio
from anyio.abc import TaskGroup
from loguru import logger

from modeld.engine.base import TokenLoop
from modeld.engine.contract import Request
from modeld.engine.gpu import gpu_offload_available
from modeld.engine.worker import loop_callback
from modeld.errors import ModeldError, NoDefaultModel
from modeld.events import EventHub
from modeld.memory.budget import MemoryBudget
from modeld.memory.probe import MemoryProbe, default_budget_mb, detect_probe
from modeld.prompt_cache.setup import build_prompt_cache
from modeld.registry import ModelFile, Registry, check_model_name
from modeld.scheduling.admission import Admission
from modeld.scheduling.calls import GenerationCalls
from modeld.scheduling.choices import ChoiceRun, check_choices, check_logprob_volume
from modeld.scheduling.clock import Clock
from modeld.scheduling.generation import Generation
from modeld.scheduling.history import EventHistory
from modeld.scheduling.instance import ModelCounters
from modeld.scheduling.launching import Launcher, embedding_inputs
from modeld.scheduling.model_checks import check_model_settings
from modeld.scheduling.pool import EngineFactory, InstancePool
from modeld.settings.config import Settings
from modeld.settings.live import LiveSettings
from modeld.settings.per_model import ResolvedModel
from modeld.sizes import MIB
from modeld.statistics import InstanceStatistics, ManagerStatistics
from modeld.types import (
    DoneReason,
    EmbeddingInput,
    EmbeddingResult,
)

__all__ = ["CLOSE_TIMEOUT_S", "ManagerStatistics", "ModelManager"]

CLOSE_TIMEOUT_S = 5.0  # at shutdown, after the grace: how long instances get to close


class ModelManager(GenerationCalls):
    """Owns the registry, the budget, every instance and every running generation.

    Use as an async context manager (asyncio or trio)::

        async with ModelManager(settings) as manager:
            async with manager.stream(InferRequest(prompt="Hi", model="m.gguf")) as gen:
                async for chunk in gen:
                    print(chunk.text, end="")
            print(gen.result)

    Entering checks the per-model settings (each ``[models."<id>"]`` names a file in the
    models dir, its chat template exists) and starts loading the pinned models.
    """

    def __init__(
        self,
        settings: Settings | LiveSettings,
        *,
        token_loop: TokenLoop | None = None,
        probe: MemoryProbe | None = None,
        events: EventHub | None = None,
        engine_factory: EngineFactory | None = None,
        registry: Registry | None = None,
        close_timeout_s: float = CLOSE_TIMEOUT_S,
        clock: Clock | None = None,
    ) -> None:
        # One holder of the settings in force, read per request (a reload swaps it).
        self.live_settings = live = (
            settings if isinstance(settings, LiveSettings) else LiveSettings(settings)
        )
        settings = live.current
        self.registry = registry or Registry(settings.models_path)
        self.events = events or EventHub()
        self._history = EventHistory()
        self.events.add_listener(self._history)
        self._gpu = settings.n_gpu_layers != 0 and gpu_offload_available()
        self._loop = token_loop = token_loop or _token_loop(settings)
        self._probe = probe or detect_probe(prefer_gpu=self._gpu)
        self._budget = _budget(settings, self._gpu)
        self.prompt_cache = build_prompt_cache(settings, self._budget, gpu=self._gpu)
        self._pool = InstancePool(
            live,
            registry=self.registry,
            events=self.events,
            token_loop=token_loop,
            probe=self._probe,
            budget=self._budget,
            gpu=self._gpu,
            retry_after_s=lambda ahead: self._admission.retry_after_s(ahead),
            engine_factory=engine_factory,
            clock=clock,
            prompt_cache=self.prompt_cache,
        )
        self._admission = Admission(live, self._pool)
        self._launcher = Launcher(live, self._pool, self.events, self._admission)
        self._generations = self._launcher.generations  # running, by request id
        self._started_s = time.monotonic()
        self._close_timeout_s = close_timeout_s
        self._task_group: TaskGroup | None = None

    async def __aenter__(self) -> Self:
        """Raises :class:`ConfigError` naming a bad ``[models."<id>"]`` table."""
        if self.settings.models:
            known = {model.id for model in await self.registry.rescan()}
            await anyio.to_thread.run_sync(check_model_settings, self.settings, known)
        await self._pool.guard.recover()  # crashes of an earlier process, before any load
        post = loop_callback()  # restores happen on engine threads; events on this loop
        self.prompt_cache.on_restore = lambda event: post(lambda: self.events.publish(event))
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._pool.start(self._task_group)
        for model_id, own in self.settings.models.items():
            if own.pin:
                self._task_group.start_soon(_load_pinned, self._pool, model_id)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.shutdown(grace_s=0.0)
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        return await self._task_group.__aexit__(exc_type, exc, tb)

    async def shutdown(self, grace_s: float) -> list[str]:
        """Stop admitting, let running streams finish for ``grace_s``, then cancel them
        (done_reason ``shutdown``), close every instance and end event subscriptions.

        Returns within ``grace_s`` plus ``close_timeout_s``: an instance whose worker does
        not stop by then (hung inside llama.cpp) is abandoned, logged and returned by id.
        Idempotent.
        """
        self._pool.accepting = False
        await self._launcher.drain(grace_s)
        self._pool.close_loads()
        deadline_s = time.monotonic() + self._close_timeout_s  # then the cache's writes
        abandoned = await self._pool.unloader.unload_all(DoneReason.SHUTDOWN, self._close_timeout_s)
        await anyio.to_thread.run_sync(self.prompt_cache.close, deadline_s - time.monotonic())
        self.events.close()
        return abandoned

    @property
    def settings(self) -> Settings:
        """The settings in force now (a config reload may replace them)."""
        return self.live_settings.current

    @property
    def accepting(self) -> bool:
        return self._pool.accepting

    async def models(self) -> list[ModelFile]:
        """Rescan the models dir (files added later are found without a restart).

        Raises :class:`ModelsDirUnavailable` when the directory does not answer in time.
        """
        return await self.registry.rescan()

    def state_of(self, model_id: str) -> str:
        instance = self._pool.get(model_id)
        return str(instance.state) if instance else "unloaded"

    def is_ready(self, model_id: str | None = None) -> bool:
        instances = self._pool.all() if model_id is None else [self._pool.get(model_id)]
        return any(i is not None and i.is_ready() for i in instances)

    def stalled_loads(self) -> list[str]:
        """Models whose load has run past ``--load-timeout``: the watchdog's signal."""
        return self._pool.stalled_loads()

    def statistics(self) -> ManagerStatistics:
        return _statistics(self)

    def choices(
        self, request: Request, count: int, *, request_id: str | None = None
    ) -> AbstractAsyncContextManager[ChoiceRun]:
        """Admit, load, queue and start ``count`` answers to ``request`` (OpenAI's ``n``,
        1 to :data:`~modeld.types.MAX_CHOICES`); yields the run once the first choice's
        loop runs. Iterating the run starts each choice when the one before has ended, on
        the slot the request holds until its last: no other request runs between them,
        and the prompt is evaluated once (choice ``i`` reuses its KV; its seed is
        ``seed + i``). :meth:`stream` is this with one choice.

        Raises before yielding: :class:`InvalidRequest` (``n`` out of bounds, and, for
        chat, :class:`NoChatTemplate`, :class:`ChatTemplateError`), :class:`ModelNotFound`,
        :class:`NoDefaultModel`, :class:`ModelInvalid`, :class:`ModelTooLarge`,
        :class:`ModelLoadFailed`, the :class:`Overloaded` family (429/503),
        :class:`ShuttingDown`, :class:`ResourcesExhausted`, :class:`ModelsDirUnavailable`.
        A ``format`` that cannot be enforced is refused before the request queues.
        Leaving the block early cancels the running choice and starts no other. Cancelled
        at any await, it leaves nothing behind: no admission, no place in the queue, no
        held slot. Log probabilities the run may report are bounded
        (:func:`~modeld.scheduling.choices.check_logprob_volume`): over the bound it
        raises :class:`InvalidRequest` (field ``logprobs``) at once, as a bad ``n`` does.
        """
        if request.logprobs is not None:
            check_choices(count)
            check_logprob_volume(request, count, self.resolve(request.model).n_ctx)
        return self._launcher.stream(request, request_id, self.resolve, count)

    async def embed(
        self,
        model: str | None,
        inputs: Sequence[EmbeddingInput],
        *,
        request_id: str | None = None,
        keep_alive: str | float | None = None,
        truncate: bool = False,
    ) -> EmbeddingResult:
        """L2-normalised embeddings of ``inputs``, in order, computed in a second context
        on the model's loaded weights (its memory charged to the budget on first use).

        Queued in the model's line like a generation. Raises :class:`InvalidRequest`
        (field ``input``: no input, too many, an empty or too long one), and what
        :meth:`stream` raises before yielding. Cancelled, it stops between inputs.
        ``keep_alive`` as for a generation. An input is a text or the model's token ids;
        ``truncate`` keeps the first batch of a longer one (else a 400)."""
        return await self._launcher.embed(
            self.model_id(model), embedding_inputs(inputs), keep_alive, truncate
        )

    def cancel_request(self, request_id: str) -> None:
        """Cancel a running generation by id. Raises :class:`RequestNotFound`."""
        self._launcher.cancel(request_id)

    def resolve(self, name: str | None) -> ResolvedModel:
        """The model a request's ``model`` names (None: the default model; an alias
        resolved) with its settings in force: id, context, threads, GPU layers,
        keep-alive, chat template, sampling defaults. Raises :class:`NoDefaultModel`,
        :class:`ModelNotFound` (``gpt-4o``), :class:`InvalidModelId` (``..``, NUL)."""
        name = name or self.settings.default_model
        if not name:
            raise NoDefaultModel("no model given and no --default-model configured")
        model = self.settings.resolve(name)
        check_model_name(model.id)
        return model

    def model_id(self, name: str | None) -> str:
        """:meth:`resolve`'s id."""
        return self.resolve(name).id

    def sampling_defaults(self, name: str | None) -> Mapping[str, object]:
        """The configured defaults of :class:`SamplingParams` fields for the model a
        request names (an alias, or None for the default model), for whoever builds a
        request from what a client sent: they fill the fields it did not set. Empty for
        a model without a table; never raises (the request's own checks come later)."""
        name = name or self.settings.default_model
        return self.settings.resolve(name).defaults if name else {}

    async def load(
        self, model_id: str, *, pin: bool | None = None, keep_alive: str | float | None = None
    ) -> InstanceStatistics:
        """Load (and warm) a model now, or refresh the keep-alive of a loaded one;
        optionally pin it against eviction and idle unload, or set its keep-alive
        (``"5m"``, seconds, ``-1`` for never; the default is ``--keep-alive``)."""
        instance = await self._pool.load(model_id, pin=pin, keep_alive=keep_alive)
        return self._pool.snapshot(instance)

    async def expire(self, model_id: str) -> None:
        """Unload a model as soon as it is idle (now, if it is): its keep-alive becomes
        0. Unlike :meth:`unload` nothing running or queued is cancelled, and a pinned
        model stays. Raises :class:`InvalidModelId` for unsafe ids; a model that is not
        loaded is left as it is."""
        await self._pool.idle.expire(model_id)

    async def unload(self, model_id: str) -> None:
        """Unload a model, cancelling its running generation (done_reason ``evicted``).

        Raises :class:`InvalidModelId` for unsafe ids, :class:`ModelNotFound` when it is
        not loaded.
        """
        await self._pool.unloader.unload_model(model_id)

    @property
    def counters(self) -> Mapping[str, ModelCounters]:
        return self._pool.lines.counters


async def _load_pinned(pool: InstancePool, model_id: str) -> None:
    """A pinned model loads at start; a failure is logged (and shown in /status)."""
    try:
        await pool.load(model_id, pin=True)
    except ModeldError as exc:
        logger.warning("pinned model did not load", model=model_id, error=exc.message)


def _token_loop(settings: Settings) -> TokenLoop:
    from modeld.engine.select import token_loop

    return token_loop(settings.token_loop)


def _budget(settings: Settings, gpu: bool) -> MemoryBudget:
    budget_mb = settings.vram_budget_mb or default_budget_mb(gpu)
    return MemoryBudget(budget_mb, min(settings.vram_margin_mb, budget_mb))


def _statistics(manager: ModelManager) -> ManagerStatistics:
    now_s, now_unix = time.monotonic(), time.time()
    return ManagerStatistics(
        budget_mb=manager._budget.budget_mb,
        margin_mb=manager._budget.margin_mb,
        used_est_mb=round(manager._budget.used_bytes / MIB, 3),
        server_time_unix=now_unix,
        uptime_seconds=round(now_s - manager._started_s, 3),
        token_loop=str(manager._loop.kind),
        memory_probe=manager._probe.kind,
        admitted=manager._admission.admitted,
        running=len(manager._generations),
        accepting=manager._pool.accepting,
        instances=tuple(manager._pool.statistics(now_s, now_unix)),
        counters=manager._pool.lines.statistics(),
        crash_containment=manager._pool.guard.statistics(),
        recent_events=manager._history.statistics(),
        prompt_cache=manager.prompt_cache.statistics(),
    )


@asynccontextmanager
async def _first_choice(run: AbstractAsyncContextManager[ChoiceRun]) -> AsyncIterator[Generation]:
    async with run as choices:
        yield choices.first
