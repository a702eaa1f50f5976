"""The budget's arithmetic on a GPU, where no GPU exists: NVML played by a fake device.

On a real GPU (docs/benchmarks.md, "GPU") the first load creates the CUDA context and
loads kernels, 586 MiB that stay with the process whatever is loaded, and each instance
grows after its first long prompt. Here the engines are real (tiny models on llama.cpp's
CPU backend); only the device's bookkeeping is simulated: an NVML-kind probe whose
per-process number is a context created by the first engine and kept for good, plus a
fixed amount per live engine. What is tested is the scheduler's accounting: the
process's own memory is charged once and never to an instance, evictions and refusals
count it, and the device total never passes the budget.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from modeld import errors
from modeld.engine.base import TokenLoop
from modeld.engine.llama_engine import EngineSettings, LlamaEngine
from modeld.registry import ModelFile
from modeld.scheduling.loading import PROCESS_CHARGE_ID
from modeld.scheduling.manager import ModelManager
from modeld.sizes import MIB
from modeld.types import InferRequest
from tests.scheduling.conftest import estimate_bytes, make_settings

pytestmark = pytest.mark.anyio

CONTEXT_BYTES = 256 * MIB
ENGINE_BYTES = 2 * MIB  # below every estimate here: the estimate is the charge


class FakeDevice:
    """NVML's per-process number for a device that only this test sees."""

    kind = "nvml"

    def __init__(self) -> None:
        self.context = False
        self.live: set[int] = set()
        self.engines_created = 0
        self.peak_bytes = 0

    def used_bytes(self) -> int:
        used = (CONTEXT_BYTES if self.context else 0) + len(self.live) * ENGINE_BYTES
        self.peak_bytes = max(self.peak_bytes, used)
        return used

    def engine_factory(
        self, model: ModelFile, settings: EngineSettings, loop: TokenLoop, n_ctx_train: int
    ) -> LlamaEngine:
        engine = LlamaEngine(model.path, settings, loop, n_ctx_train)
        self.context = True  # created by the first engine, kept by the process
        self.engines_created += 1
        self.live.add(id(engine))
        close = engine.close

        def close_and_free() -> None:
            self.live.discard(id(engine))
            close()

        engine.close = close_and_free  # type: ignore[method-assign]
        self.used_bytes()  # the peak includes every engine at its creation
        return engine


def manager_on(
    device: FakeDevice, models_dir: Path, token_loop: TokenLoop, **flags: Any
) -> ModelManager:
    return ModelManager(
        make_settings(models_dir, **flags),
        token_loop=token_loop,
        probe=device,
        engine_factory=device.engine_factory,
    )


def ask(model: str) -> InferRequest:
    return InferRequest(prompt="hello", model=model, max_tokens=4, temperature=0.0)


async def test_the_process_is_charged_once_and_outlives_every_instance(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    device = FakeDevice()
    estimate = estimate_bytes(models_dir, "tiny-a.gguf")
    async with manager_on(device, models_dir, token_loop, vram_budget_mb=1024) as manager:
        budget = manager._budget
        await manager.load("tiny-a.gguf")
        assert device.engines_created == 2  # measured once: loaded, warmed up, closed
        assert budget.charge_of(PROCESS_CHARGE_ID) == CONTEXT_BYTES
        assert budget.charge_of("tiny-a.gguf") == estimate  # not the context's 256 MiB
        await manager.load("tiny-b.gguf")
        assert device.engines_created == 3  # no second measurement
        await manager.unload("tiny-a.gguf")  # the instance whose load made the context
        assert budget.used_bytes == CONTEXT_BYTES + budget.charge_of("tiny-b.gguf")
        assert manager.statistics().used_est_mb == round(budget.used_bytes / MIB, 3)
        await manager.unload("tiny-b.gguf")
        assert budget.used_bytes == CONTEXT_BYTES == device.used_bytes()


async def test_eviction_makes_room_for_the_process_too(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    device = FakeDevice()
    estimate = estimate_bytes(models_dir, "tiny-a.gguf")
    # Two instances fit beside each other, not beside the process's own memory as well.
    budget_mb = math.ceil((CONTEXT_BYTES + 1.5 * estimate) / MIB)
    assert 2 * estimate <= budget_mb * MIB
    async with manager_on(device, models_dir, token_loop, vram_budget_mb=budget_mb) as manager:
        await manager.complete(ask("tiny-a.gguf"))
        await manager.complete(ask("tiny-b.gguf"))
        loaded = [s.model_id for s in manager.statistics().instances]
        evictions = manager.counters["tiny-a.gguf"].evictions_total
    assert loaded == ["tiny-b.gguf"]
    assert evictions == 1
    assert device.peak_bytes <= budget_mb * MIB


async def test_a_model_that_fits_only_without_the_process_is_refused(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    device = FakeDevice()
    estimate = estimate_bytes(models_dir, "tiny-a.gguf")
    budget_mb = math.ceil((CONTEXT_BYTES + 0.5 * estimate) / MIB)
    assert estimate <= budget_mb * MIB  # it would fit an empty device
    async with manager_on(device, models_dir, token_loop, vram_budget_mb=budget_mb) as manager:
        with pytest.raises(errors.ModelTooLarge, match="256 MiB of it the process's own"):
            await manager.load("tiny-a.gguf")
        assert manager._budget.used_bytes == CONTEXT_BYTES
    assert device.live == set()


async def test_a_model_too_large_for_an_empty_device_is_not_loaded_to_measure(
    models_dir: Path, token_loop: TokenLoop
) -> None:
    device = FakeDevice()
    estimate = estimate_bytes(models_dir, "tiny-a.gguf")
    budget_mb = max(1, estimate // MIB - 1)
    async with manager_on(device, models_dir, token_loop, vram_budget_mb=budget_mb) as manager:
        with pytest.raises(errors.ModelTooLarge):
            await manager.load("tiny-a.gguf")
        assert manager._budget.used_bytes == 0
    assert device.engines_created == 0
