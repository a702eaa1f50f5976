"""The registry is the only way to a file: unsafe ids are refused, never opened."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modeld.errors import InvalidModelId, ModelNotFound
from modeld.registry import Registry, check_model_id


@pytest.mark.parametrize(
    ("model_id", "why"),
    [
        ("../secret.gguf", "parent traversal"),
        ("..", "bare parent"),
        ("a/../b.gguf", "separator and traversal"),
        ("sub/model.gguf", "path separator"),
        ("sub\\model.gguf", "windows separator"),
        ("/etc/passwd", "absolute path"),
        ("/abs/model.gguf", "absolute gguf"),
        ("model\x00.gguf", "NUL byte"),
        ("model.bin", "not a .gguf"),
        ("model", "no extension"),
        (".hidden.gguf", "leading dot"),
        ("mo del.gguf", "space"),
        ("e\u0301.gguf", "not NFC"),
        ("x" * 300 + ".gguf", "too long"),
    ],
)
def test_unsafe_ids_are_rejected(model_id: str, why: str) -> None:
    with pytest.raises(InvalidModelId):
        check_model_id(model_id)


def test_safe_ids_pass() -> None:
    assert check_model_id("gemma-3-270m-q4_k_m.gguf") == "gemma-3-270m-q4_k_m.gguf"
    assert check_model_id("Qwen2.5+x.gguf") == "Qwen2.5+x.gguf"


def test_scan_lists_gguf_files_only(models_dir: Path) -> None:
    (models_dir / "notes.txt").write_text("not a model")
    (models_dir / "dir.gguf").mkdir()
    ids = [m.id for m in Registry(models_dir).scan()]
    assert ids == ["tiny-a.gguf", "tiny-b.gguf", "tiny-c.gguf"]


def test_model_fields(models_dir: Path) -> None:
    model = Registry(models_dir).resolve("tiny-a.gguf")
    assert model.name == model.id == "tiny-a.gguf"
    assert model.path == (models_dir / "tiny-a.gguf").resolve()
    assert model.path.is_absolute()
    assert model.size_bytes == (models_dir / "tiny-a.gguf").stat().st_size


def test_file_added_later_is_found_without_restart(models_dir: Path) -> None:
    registry = Registry(models_dir)
    registry.scan()
    with pytest.raises(ModelNotFound):
        registry.resolve("late.gguf")
    (models_dir / "late.gguf").write_bytes((models_dir / "tiny-a.gguf").read_bytes())
    assert registry.resolve("late.gguf").id == "late.gguf"
    assert "late.gguf" in [m.id for m in registry.scan()]


def test_symlink_outside_the_dir_is_refused(models_dir: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    (models_dir / "link.gguf").symlink_to(outside)
    with pytest.raises(InvalidModelId):
        Registry(models_dir).resolve("link.gguf")
    assert "link.gguf" not in [m.id for m in Registry(models_dir).scan()]


def test_symlink_inside_the_dir_is_allowed(models_dir: Path) -> None:
    (models_dir / "alias.gguf").symlink_to(models_dir / "tiny-a.gguf")
    assert Registry(models_dir).resolve("alias.gguf").size_bytes > 0


def test_non_regular_files_are_not_models(models_dir: Path) -> None:
    (models_dir / "dir.gguf").mkdir()
    os.mkfifo(models_dir / "fifo.gguf")
    registry = Registry(models_dir)
    for model_id in ["dir.gguf", "fifo.gguf"]:
        with pytest.raises(ModelNotFound):
            registry.resolve(model_id)


def test_missing_and_empty_dirs_are_empty_registries(tmp_path: Path) -> None:
    assert Registry(tmp_path / "does-not-exist").scan() == []
    empty = tmp_path / "empty"
    empty.mkdir()
    assert Registry(empty).scan() == []
    with pytest.raises(ModelNotFound):
        Registry(empty).resolve("any.gguf")
