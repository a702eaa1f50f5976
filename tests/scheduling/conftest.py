from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from modeld.config import Settings, load_settings
from modeld.engine.base import TokenLoop
from modeld.scheduling.manager import ModelManager


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


@pytest.fixture
def manager_factory(token_loop: TokenLoop):  # type: ignore[no-untyped-def]
    def build(models_dir: Path, **overrides: Any) -> ModelManager:
        return ModelManager(
            make_settings(models_dir, **overrides), token_loop=token_loop, probe=ConstantProbe()
        )

    return build
