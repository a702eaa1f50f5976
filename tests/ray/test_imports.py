"""Ray is optional: ``import modeld`` never imports it, nor do modeld.ray's pure parts."""

from __future__ import annotations

import subprocess
import sys

import pytest

import modeld.ray


def _imported_after(statement: str) -> list[str]:
    code = f"import sys; {statement}; print(','.join(m for m in ('ray',) if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def test_import_modeld_does_not_import_ray() -> None:
    assert _imported_after("import modeld") == []


def test_the_pure_parts_do_not_import_ray() -> None:
    statement = "import modeld.ray, modeld.ray.routing, modeld.ray.cluster, modeld.ray.bridge"
    assert _imported_after(statement) == []


def test_the_builder_imports_ray_on_first_use() -> None:
    pytest.importorskip("ray")
    assert _imported_after("from modeld.ray import app_builder") == ["ray"]


def test_the_public_surface_is_sorted() -> None:
    assert modeld.ray.__all__ == sorted(modeld.ray.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = modeld.ray.no_such_name  # type: ignore[attr-defined]
