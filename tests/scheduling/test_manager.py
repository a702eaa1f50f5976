"""ModelManager on real llama.cpp with tiny models, under asyncio and trio."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from anyio.lowlevel import checkpoint

from modeld import errors
from modeld.engine.base import TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.registry import ModelFile
from modeld.scheduling.manager import ModelManager
from modeld.settings.per_model import ModelSettings
from modeld.types import Chunk, DoneReason, GenerationResult, InferRequest, InstanceState
from tests.scheduling.conftest import ConstantProbe, make_settings

pytestmark = pytest.mark.anyio

Factory = Callable[..., ModelManager]


def ask(model: str | None = "tiny-a.gguf", **fields: Any) -> InferRequest:
    fields.setdefault("max_tokens", 16)
    fields.setdefault("temperature", 0.0)
    return InferRequest(prompt=fields.pop("prompt", "hello"), model=model, **fields)


async def test_stream_yields_chunks_then_one_result(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        items = [item async for item in manager.generate(ask(max_tokens=12))]
    chunks, last = items[:-1], items[-1]
    assert all(isinstance(c, Chunk) for c in chunks)
    assert isinstance(last, GenerationResult)
    assert last.done_reason is DoneReason.LENGTH
    assert sum(c.tokens for c in chunks) == last.metrics.completion_tokens == 12
    assert last.model == "tiny-a.gguf"
    assert last.metrics.prompt_tokens > 0
    assert last.metrics.total_ms >= last.metrics.ttft_ms > 0


async def test_greedy_output_is_deterministic(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir) as manager:
        first, _ = await manager.complete(ask(max_tokens=20))
        second, _ = await manager.complete(ask(max_tokens=20))
        other, _ = await manager.complete(ask("tiny-b.gguf", max_tokens=20))
    assert first == second
    assert first != other  # a different model really answered


async def test_default_model_and_missing_default(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir, default_model="tiny-b.gguf") as manager:
        _, result = await manager.complete(ask(model=None))
        assert result.model == "tiny-b.gguf"
    async with manager_factory(models_dir) as manager:
        with pytest.raises(errors.NoDefaultModel):
            await manager.complete(ask(model=None))


async def test_unknown_and_unsafe_models(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir) as manager:
        with pytest.raises(errors.ModelNotFound):
            await manager.complete(ask("missing.gguf"))
        with pytest.raises(errors.InvalidModelId):
            await manager.complete(ask("../tiny-a.gguf"))
        assert manager.statistics().admitted == 0


async def test_max_tokens_is_capped_by_the_context_and_the_prompt_must_fit(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        _, capped = await manager.complete(ask(max_tokens=250, prompt="hello " * 10))
        assert capped.done_reason is DoneReason.LENGTH
        metrics = capped.metrics
        assert metrics.prompt_tokens + metrics.completion_tokens == 256  # the whole context
        with pytest.raises(errors.ContextLengthExceeded) as caught:
            await manager.complete(ask(max_tokens=4, prompt="hello " * 200))
        assert caught.value.field == "prompt"
        # the instance is free again for the next request
        _, result = await manager.complete(ask(max_tokens=4))
        assert result.done_reason is DoneReason.LENGTH


async def test_concurrent_requests_trigger_one_load(
    manager_factory: Factory, models_dir: Path
) -> None:
    results: list[GenerationResult] = []
    async with manager_factory(models_dir) as manager:

        async def one() -> None:
            results.append((await manager.complete(ask(max_tokens=8)))[1])

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(one)
        assert manager.counters["tiny-a.gguf"].loads_total == 1
    assert [r.done_reason for r in results] == [DoneReason.LENGTH] * 5


async def test_fifo_within_a_model(manager_factory: Factory, models_dir: Path) -> None:
    started: list[int] = []
    async with manager_factory(models_dir) as manager:
        await manager.load("tiny-a.gguf")
        async with manager.stream(ask()) as holder:  # keeps the instance busy
            async with anyio.create_task_group() as tasks:

                async def queued(index: int) -> None:
                    async with manager.stream(ask(max_tokens=2)) as generation:
                        started.append(index)
                        async for _ in generation:
                            pass

                for index in range(4):
                    tasks.start_soon(queued, index)
                    await anyio.wait_all_tasks_blocked()
                assert manager.statistics().instances[0].queue_len == 4
                async for _ in holder:
                    pass
                # leaving `holder` releases the slot; the queue drains in order
                tasks.cancel_scope.deadline = anyio.current_time() + 30
            assert started == [0, 1, 2, 3]


async def test_queue_full_is_rejected_at_once(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir, max_queue_depth=1) as manager:
        await manager.load("tiny-a.gguf")
        async with manager.stream(ask()), anyio.create_task_group() as tasks:
            tasks.start_soon(manager.complete, ask())
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(errors.QueueFull) as caught:
                await manager.complete(ask())
            assert caught.value.retry_after_s >= 1
            tasks.cancel_scope.cancel()


async def test_queue_timeout_after_max_wait(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir, max_wait_ms=50) as manager:
        await manager.load("tiny-a.gguf")
        async with manager.stream(ask()):
            with pytest.raises(errors.QueueTimeout) as caught:
                await manager.complete(ask())
            assert caught.value.retry_after_s >= 1
            assert manager.statistics().instances[0].queue_len == 0


async def test_global_inflight_cap(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir, max_inflight=1) as manager:
        async with manager.stream(ask()):
            with pytest.raises(errors.TooManyInflight):
                await manager.complete(ask("tiny-b.gguf"))
        _, result = await manager.complete(ask("tiny-b.gguf"))
        assert result.done_reason is DoneReason.LENGTH


async def test_cancelled_waiter_leaves_the_queue(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        await manager.load("tiny-a.gguf")
        async with manager.stream(ask()) as holder:
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(manager.complete, ask())
                    await anyio.wait_all_tasks_blocked()
                    assert manager.statistics().instances[0].queue_len == 1
                    scope.cancel()
            assert manager.statistics().instances[0].queue_len == 0
            assert manager.statistics().admitted == 1
            async for _ in holder:
                pass
        _, result = await manager.complete(ask(max_tokens=2))
        assert result.done_reason is DoneReason.LENGTH


async def test_leaving_a_stream_early_cancels_it(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir, n_ctx=512) as manager:
        async with manager.stream(ask(max_tokens=400)) as generation:
            async for _ in generation:
                break
        assert generation.result is not None
        assert generation.result.done_reason is DoneReason.CANCELLED
        assert generation.result.metrics.completion_tokens < 400
        assert manager.statistics().instances[0].inflight == 0


async def test_cancel_request_by_id(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir) as manager:
        async with manager.stream(ask(max_tokens=200), request_id="r-1") as generation:
            manager.cancel_request("r-1")
            async for _ in generation:
                pass
        assert generation.result is not None
        assert generation.result.done_reason is DoneReason.CANCELLED
        with pytest.raises(errors.RequestNotFound):
            manager.cancel_request("r-1")


async def test_unload_of_a_busy_instance_ends_its_stream_as_evicted(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        async with manager.stream(ask(max_tokens=200)) as generation:
            await manager.unload("tiny-a.gguf")
            async for _ in generation:
                pass
        assert generation.result is not None
        assert generation.result.done_reason is DoneReason.EVICTED
        assert manager.state_of("tiny-a.gguf") == "unloaded"
        assert manager.statistics().used_est_mb == 0
        with pytest.raises(errors.ModelNotFound):
            await manager.unload("tiny-a.gguf")


async def test_request_that_never_started_gets_infer_timeout(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir, infer_timeout=0.1) as manager:
        await manager.load("tiny-a.gguf")
        async with manager.stream(ask()):
            with pytest.raises(errors.InferTimeout):
                await manager.complete(ask())
            assert manager.statistics().instances[0].queue_len == 0


async def test_different_models_generate_in_parallel(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with (
        manager_factory(models_dir) as manager,
        manager.stream(ask("tiny-a.gguf")) as a,
        manager.stream(ask("tiny-b.gguf")) as b,
    ):
        stats = {i.model_id: i.inflight for i in manager.statistics().instances}
        assert stats == {"tiny-a.gguf": 1, "tiny-b.gguf": 1}
        texts = ["".join([c.text async for c in g]) for g in (a, b)]
    assert all(texts)


async def test_shutdown_cancels_running_streams(manager_factory: Factory, models_dir: Path) -> None:
    manager = manager_factory(models_dir)
    async with manager:
        async with manager.stream(ask(max_tokens=200)) as generation:
            await manager.shutdown(grace_s=0.0)
            async for _ in generation:
                pass
        with pytest.raises(errors.ShuttingDown):
            await manager.complete(ask())
    assert generation.result is not None
    assert generation.result.done_reason in {DoneReason.SHUTDOWN, DoneReason.LENGTH}
    assert manager.statistics().instances == ()


async def test_lifecycle_events_are_published(manager_factory: Factory, models_dir: Path) -> None:
    async with manager_factory(models_dir) as manager, manager.events.subscribe() as events:
        await manager.load("tiny-a.gguf")
        await manager.unload("tiny-a.gguf")
        kinds: list[str] = []
        while not kinds or kinds[-1] != "model_evicted":
            kinds.append((await events.next()).kind)
    progress = [k for k in kinds if k == "model_loading_progress"]
    assert len(progress) == 3  # validated, memory reserved, weights loaded
    assert [k for k in kinds if k != "model_loading_progress"] == [
        "model_load_started",
        "model_ready",
        "model_evicted",
    ]


async def test_pin_keeps_instance_and_status_shows_it(
    manager_factory: Factory, models_dir: Path
) -> None:
    async with manager_factory(models_dir) as manager:
        stats = await manager.load("tiny-a.gguf", pin=True)
        assert stats.pinned
        assert stats.state is InstanceState.READY
        assert stats.loads_total == 1
        await checkpoint()


async def test_watchdog_reports_a_load_hung_past_the_load_timeout(
    token_loop: TokenLoop, models_dir: Path
) -> None:
    """A load that never returns (a fault real llama.cpp cannot be made to produce on
    demand) is injected through the engine factory; readiness must notice it."""
    release = threading.Event()

    def hanging_factory(
        model: ModelFile, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
    ) -> LlamaEngine:
        release.wait(timeout=30)
        return LlamaEngine(model.path, settings, loop, n_ctx_train)

    settings = make_settings(models_dir, load_timeout=0.05, max_wait_ms=50)
    manager = ModelManager(
        settings, token_loop=token_loop, probe=ConstantProbe(), engine_factory=hanging_factory
    )
    async with manager:
        with pytest.raises(errors.QueueTimeout):
            await manager.complete(ask())  # gives up waiting; the load goes on
        await anyio.sleep(0.1)  # past --load-timeout: the threshold is wall-clock time
        assert manager.stalled_loads() == ["tiny-a.gguf"]
        assert not manager.is_ready("tiny-a.gguf")
        release.set()
        await manager.load("tiny-a.gguf")  # waits for the same load to finish
        assert manager.is_ready("tiny-a.gguf")
        assert manager.stalled_loads() == []


async def test_resolve_gives_the_id_and_the_settings_in_force(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    """One call answers what a name means: for the layers that build requests (sampling
    defaults, the Ollama layer) and for the manager itself."""
    own = ModelSettings(aliases=("fast",), n_ctx=128, keep_alive="1m", defaults={"top_k": 5})
    settings = msgspec.structs.replace(
        make_settings(models_dir, default_model="fast"), models={"tiny-a.gguf": own}
    )
    manager = ModelManager(settings, token_loop=token_loop, probe=ConstantProbe())
    model = manager.resolve(None)  # the default model, through its alias
    assert (model.id, model.n_ctx, model.keep_alive, model.threads) == ("tiny-a.gguf", 128, "1m", 1)
    assert manager.model_id("fast") == "tiny-a.gguf"
    assert manager.sampling_defaults("fast") == model.defaults == {"top_k": 5}
    assert manager.resolve("tiny-b.gguf").n_ctx == 256  # the global value
    with pytest.raises(errors.InvalidModelId):
        manager.resolve("../etc/passwd")
    with pytest.raises(errors.ModelNotFound):  # a name no file has: not here, not unsafe
        manager.resolve("gpt-4o")
    no_default = ModelManager(make_settings(models_dir), token_loop=token_loop)
    with pytest.raises(errors.NoDefaultModel):
        no_default.resolve(None)
    assert no_default.sampling_defaults(None) == {}
