from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modeld.engine.base import TokenLoop
from modeld.engine.gpu import gpu_offload_available
from modeld.gguf import read_gguf_header
from modeld.memory.estimate import estimate_footprint
from modeld.scheduling.manager import ModelManager
from modeld.settings.config import Settings, load_settings


class ConstantProbe:
    """Measures no growth, so each charge is llama.cpp's own reported size: deterministic
    budgets for scheduler tests. The real RSS/NVML probes are tested in tests/memory."""

    kind = "constant"

    def used_bytes(self) -> int:
        return 0


def make_settings(models_dir: Path, **overrides: Any) -> Settings:
    flags = {"models_dir": str(models_dir), "n_ctx": "256", "threads": "1", "vram_margin_mb": "0"}
    flags.update({key: str(value) for key, value in overrides.items()})
    return load_settings(flags, env={})


def estimate_bytes(models_dir: Path, model: str, **overrides: Any) -> int:
    """The estimate a manager built on ``make_settings(models_dir, **overrides)`` reserves
    for ``model``: a GPU estimate on a build that offloads, so that budgets derived from it
    mean the same on a CPU and a GPU build."""
    settings = make_settings(models_dir, **overrides)
    header = read_gguf_header(models_dir / model)
    return estimate_footprint(
        header,
        n_ctx=min(settings.n_ctx, header.context_length),
        n_gpu_layers=settings.n_gpu_layers,
        n_batch=settings.n_batch,
        gpu=settings.n_gpu_layers != 0 and gpu_offload_available(),
    ).total_bytes


@pytest.fixture
def manager_factory(token_loop: TokenLoop):  # type: ignore[no-untyped-def]
    def build(models_dir: Path, **overrides: Any) -> ModelManager:
        return ModelManager(
            make_settings(models_dir, **overrides), token_loop=token_loop, probe=ConstantProbe()
        )

    return build
