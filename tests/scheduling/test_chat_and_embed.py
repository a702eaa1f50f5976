"""``ModelManager.chat``/``stream_chat``/``embed`` and per-model settings on real llama.cpp
with tiny models, under asyncio and trio: chats and embeddings take the model's line like
any request, the embedding context is charged to the budget (evicting as a load does),
pinned models load at start and stay."""

from __future__ import annotations

import math
from pathlib import Path

import anyio
import msgspec
import pytest

from modeld import errors
from modeld.engine.base import TokenLoop
from modeld.events import ModelReady
from modeld.gguf import read_gguf_header
from modeld.memory.estimate import embedding_context_bytes, estimate_footprint
from modeld.scheduling.manager import ModelManager
from modeld.settings.per_model import ModelSettings
from modeld.sizes import MIB
from modeld.types import (
    ChatMessage,
    ChatRequest,
    DoneReason,
    InferRequest,
    context_sizes,
    embedding_context_sizes,
)
from tests.scheduling.conftest import ConstantProbe, make_settings
from tests.support.tiny_gguf import TINY_CHAT_TEMPLATE, TinyModelSpec, write_tiny_gguf

pytestmark = pytest.mark.anyio

HELLO = (ChatMessage("user", "hello world"),)


@pytest.fixture
def chat_dir(models_dir: Path) -> Path:
    spec = TinyModelSpec(seed=0, chat_template=TINY_CHAT_TEMPLATE)
    write_tiny_gguf(models_dir / "tiny-chat.gguf", spec)
    return models_dir


def manager_with(
    models_dir: Path, token_loop: TokenLoop, models: dict[str, ModelSettings], **flags: object
) -> ModelManager:
    settings = msgspec.structs.replace(make_settings(models_dir, **flags), models=models)
    return ModelManager(settings, token_loop=token_loop, probe=ConstantProbe())


async def test_chat_and_stream_chat_agree(chat_dir: Path, token_loop: TokenLoop) -> None:
    models = {"tiny-chat.gguf": ModelSettings(aliases=("chat",))}
    request = ChatRequest(messages=HELLO, model="chat", max_tokens=12, temperature=0)
    async with manager_with(chat_dir, token_loop, models) as manager:
        text, result = await manager.chat(request)
        async with manager.stream_chat(request) as generation:
            streamed = "".join([chunk.text async for chunk in generation])
        as_dicts = ChatRequest(
            messages=[{"role": "user", "content": "hello world"}],  # type: ignore[list-item]
            model="tiny-chat.gguf", max_tokens=12, temperature=0,
        )  # fmt: skip
        again, _ = await manager.chat(as_dicts)
    assert text == streamed == again
    assert result.model == "tiny-chat.gguf"  # the alias resolved
    assert result.done_reason is DoneReason.LENGTH
    assert result.metrics.completion_tokens == 12


async def test_a_schema_that_cannot_be_enforced_is_refused_before_queueing(
    chat_dir: Path, token_loop: TokenLoop
) -> None:
    request = ChatRequest(messages=HELLO, model="tiny-chat.gguf", format={"type": "nope"})
    async with manager_with(chat_dir, token_loop, {}) as manager:
        with pytest.raises(errors.InvalidRequest) as caught:
            await manager.chat(request)
        stats = manager.statistics()
    assert caught.value.field == "format"
    assert (stats.admitted, stats.instances) == (0, ())  # nothing loaded for it


async def test_embed_charges_its_context_once(models_dir: Path, token_loop: TokenLoop) -> None:
    async with manager_with(models_dir, token_loop, {}) as manager:
        await manager.load("tiny-a.gguf")
        loaded_mb = manager.statistics().used_est_mb
        result = await manager.embed("tiny-a.gguf", ["hello", "world"])
        charged_mb = manager.statistics().used_est_mb
        await manager.embed("tiny-a.gguf", ["again"])
        assert manager.statistics().used_est_mb == charged_mb
        await manager.unload("tiny-a.gguf")
        assert manager.statistics().used_est_mb == 0
    assert len(result.embeddings) == 2
    assert result.model == "tiny-a.gguf"
    assert result.prompt_tokens > 2
    header = read_gguf_header(models_dir / "tiny-a.gguf")
    sizes = context_sizes(256, 512, header.context_length)
    expected = embedding_context_bytes(
        header, n_tokens=embedding_context_sizes(sizes).n_ubatch, n_gpu_layers=-1, gpu=False
    )
    assert charged_mb - loaded_mb == pytest.approx(expected / MIB, abs=1e-3)


async def test_the_embedding_context_evicts_an_idle_model_to_fit(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    """Room for two tiny instances, not for an embedding context as well: embedding with
    one evicts the other (least recently used, idle), as a load would."""
    header = read_gguf_header(models_dir / "tiny-a.gguf")
    sizes = context_sizes(256, 512, header.context_length)
    instance = estimate_footprint(header, n_ctx=256, n_gpu_layers=-1, n_batch=512, gpu=False)
    embedding = embedding_context_bytes(
        header, n_tokens=embedding_context_sizes(sizes).n_ubatch, n_gpu_layers=-1, gpu=False
    )
    budget_mb = math.ceil(2 * instance.total_bytes / MIB)
    assert 2 * instance.total_bytes <= budget_mb * MIB < 2 * instance.total_bytes + embedding
    async with manager_with(models_dir, token_loop, {}, vram_budget_mb=budget_mb) as manager:
        await manager.load("tiny-b.gguf")
        await manager.load("tiny-a.gguf")
        await manager.embed("tiny-a.gguf", ["hello"])
        loaded = [i.model_id for i in manager.statistics().instances]
        assert loaded == ["tiny-a.gguf"]
        assert manager.counters["tiny-b.gguf"].evictions_total == 1


async def test_an_embedding_waits_its_turn_in_the_models_line(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    order: list[str] = []
    async with manager_with(models_dir, token_loop, {}) as manager:
        await manager.load("tiny-a.gguf")

        async def generate() -> None:
            request = InferRequest(prompt="hello", model="tiny-a.gguf", max_tokens=200)
            async with manager.stream(request) as generation:
                started.set()
                async for _ in generation:
                    pass
            order.append("generation")

        async def embed() -> None:
            await started.wait()
            await manager.embed("tiny-a.gguf", ["hello"])
            order.append("embedding")

        started = anyio.Event()
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(generate)
            tasks.start_soon(embed)
    assert order == ["generation", "embedding"]


async def test_a_cancelled_embedding_leaves_nothing_behind(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    """Cancelled mid-way, it stops between inputs; the model stays busy until it has (the
    next request waits its turn behind it), then nothing is held."""
    async with manager_with(models_dir, token_loop, {}) as manager:
        await manager.load("tiny-a.gguf")
        with anyio.move_on_after(0.05) as scope:
            await manager.embed("tiny-a.gguf", ["hello world and the"] * 2000)
        assert scope.cancelled_caught
        result = await manager.embed("tiny-a.gguf", ["hello"])  # queued behind its end
        stats = manager.statistics()
    assert len(result.embeddings) == 1
    assert stats.admitted == 0
    assert [(i.inflight, i.queue_len) for i in stats.instances] == [(0, 0)]


async def test_pinned_models_load_at_start_and_are_never_evicted(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    header = read_gguf_header(models_dir / "tiny-a.gguf")
    instance = estimate_footprint(header, n_ctx=256, n_gpu_layers=-1, n_batch=512, gpu=False)
    budget_mb = math.ceil(2 * instance.total_bytes / MIB)  # two instances, not three
    models = {"tiny-a.gguf": ModelSettings(pin=True)}
    manager = manager_with(models_dir, token_loop, models, vram_budget_mb=budget_mb)
    async with manager.events.subscribe() as events, manager:
        with anyio.fail_after(30):
            while not isinstance(await events.next(), ModelReady):
                pass  # loading at start, nobody asked for it
        assert manager.is_ready("tiny-a.gguf")
        await manager.complete(InferRequest(prompt="x", model="tiny-b.gguf", max_tokens=2))
        await manager.complete(InferRequest(prompt="x", model="tiny-c.gguf", max_tokens=2))
        loaded = sorted(i.model_id for i in manager.statistics().instances)
    assert loaded == ["tiny-a.gguf", "tiny-c.gguf"]  # b was evicted, not the pinned a


async def test_per_model_context_and_an_unknown_id(models_dir: Path, token_loop: TokenLoop) -> None:
    models = {"tiny-a.gguf": ModelSettings(n_ctx=64)}
    async with manager_with(models_dir, token_loop, models) as manager:
        _, capped = await manager.complete(
            InferRequest(prompt="x", model="tiny-a.gguf", max_tokens=100)
        )  # max_tokens past the context is a cap: the model's own 64 tokens
        assert capped.metrics.prompt_tokens + capped.metrics.completion_tokens == 64
        _, result = await manager.complete(
            InferRequest(prompt="x", model="tiny-b.gguf", max_tokens=100)
        )
        assert result.metrics.completion_tokens == 100  # the global 256 for the others
    unknown = {"no-such.gguf": ModelSettings(pin=True)}
    with pytest.raises(errors.ConfigError, match=r'models\."no-such\.gguf"'):
        async with manager_with(models_dir, token_loop, unknown):
            pass


async def test_settings_are_read_from_the_managers_current_settings(
    chat_dir: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    """A replaced ``Settings`` (a config reload) changes a model's template at once."""
    manager = manager_with(chat_dir, token_loop, {})
    request = ChatRequest(messages=HELLO, model="tiny-chat.gguf", max_tokens=1)
    async with manager:
        _, own = await manager.chat(request)
        outcome = manager.live_settings.apply(
            msgspec.structs.replace(
                manager.settings, models={"tiny-chat.gguf": ModelSettings(chat_template="chatml")}
            )
        )
        assert [change.name for change in outcome.applied] == ["models"]
        _, chatml = await manager.chat(request)
    assert own.metrics.prompt_tokens != chatml.metrics.prompt_tokens
