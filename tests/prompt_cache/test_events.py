"""A restore from the prompt cache is a lifecycle event (``prompt_cache_restored`` on
``/events``), published on the event loop although the restore runs on the engine's
thread."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest

from modeld.engine.base import TokenLoop
from modeld.events import PromptCacheRestored
from modeld.scheduling.manager import ModelManager
from modeld.sizes import MIB
from modeld.types import InferRequest
from tests.scheduling.conftest import ConstantProbe, make_settings
from tests.support.prompts import long_prompt

pytestmark = pytest.mark.anyio

MODEL = "tiny-a.gguf"


async def test_a_restore_after_an_unload_is_published(
    models_dir: Path, token_loop: TokenLoop, tmp_path: Path
) -> None:
    settings = make_settings(
        models_dir,
        n_ctx=1024,
        prompt_cache_mb=64,
        prompt_cache_disk_mb=0,
        state_dir=tmp_path / "state",
    )
    manager = ModelManager(settings, token_loop=token_loop, probe=ConstantProbe())
    prompt = long_prompt(3)  # ~250 tiny-model tokens, of its 512
    seen: list[PromptCacheRestored] = []
    async with manager.events.subscribe() as events, manager:
        await manager.complete(InferRequest(prompt=prompt, model=MODEL, max_tokens=4))
        await manager.unload(MODEL)  # the instance saves its prefix as it closes
        saved = manager.prompt_cache.statistics()
        assert saved.memory_entries == 1
        _, result = await manager.complete(
            InferRequest(prompt=prompt + " and the world", model=MODEL, max_tokens=4)
        )
        with anyio.fail_after(30):
            while not seen:
                event = await events.next()
                if isinstance(event, PromptCacheRestored):
                    seen.append(event)
        recent = [event.kind for event in manager.statistics().recent_events]
    (restored,) = seen
    assert restored.kind == "prompt_cache_restored"
    assert (restored.model, restored.tier) == (MODEL, "memory")
    assert restored.tokens == result.metrics.cached_tokens > 32
    assert manager.prompt_cache.statistics().hits_memory == 1
    assert "model_evicted" in recent  # /status keeps loads and unloads, not restores
    assert "prompt_cache_restored" not in recent
    assert restored.mib == round(saved.memory_bytes / MIB, 2)  # the one entry's size
