"""Settings precedence is flag > env > TOML file > default; bad values name the setting."""

from __future__ import annotations

import argparse
from pathlib import Path

import msgspec
import pytest

from modeld.errors import ConfigError
from modeld.settings.config import Settings, add_settings_arguments, bool_flags, load_settings
from modeld.types import LoopKind


def test_defaults() -> None:
    settings = load_settings({}, env={})
    assert settings == Settings()
    assert settings.max_queue_depth == 32
    assert settings.max_wait_ms == 30_000
    assert settings.host == "127.0.0.1"
    assert settings.token_loop is LoopKind.C


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text("[modeld]\nport = 1111\nn_ctx = 1024\nmax_queue_depth = 3\n")
    env = {"MODELD_PORT": "2222", "MODELD_N_CTX": "2048"}
    settings = load_settings({"port": "3333", "config": str(config)}, env=env)
    assert settings.port == 3333  # flag
    assert settings.n_ctx == 2048  # env beats file
    assert settings.max_queue_depth == 3  # file beats default


def test_config_file_from_env(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("default_model = 'm.gguf'\ncors_origins = ['http://a']\n")
    settings = load_settings({}, env={"MODELD_CONFIG": str(config)})
    assert settings.default_model == "m.gguf"
    assert settings.cors_origins == ["http://a"]


def test_env_lists_and_bools() -> None:
    env = {"MODELD_CORS_ORIGINS": "http://a, http://b", "MODELD_PREWARM_DEFAULT": "true"}
    settings = load_settings({}, env=env)
    assert settings.cors_origins == ["http://a", "http://b"]
    assert settings.prewarm_default is True


@pytest.mark.parametrize(
    ("flags", "env"),
    [
        ({"port": "eighty"}, {}),
        ({"port": "70000"}, {}),
        ({"n_ctx": "0"}, {}),
        ({}, {"MODELD_MAX_QUEUE_DEPTH": "-1"}),
        ({}, {"MODELD_PREWARM_DEFAULT": "maybe"}),
        ({}, {"MODELD_TOKEN_LOOP": "rust"}),
    ],
)
def test_bad_values_are_config_errors(flags: dict[str, str], env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        load_settings(flags, env=env)


def test_bad_files_are_config_errors(tmp_path: Path) -> None:
    broken = tmp_path / "broken.toml"
    broken.write_text("port = [")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("prot = 1\n")
    for path in [broken, unknown, tmp_path / "missing.toml"]:
        with pytest.raises(ConfigError):
            load_settings({"config": str(path)}, env={})


BOOL_SETTINGS = sorted(
    f.name for f in msgspec.structs.fields(Settings) if f.type is bool or f.type == "bool"
)


def parse_flags(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return load_settings(vars(parser.parse_args(argv)), env={})


def test_every_boolean_setting_is_known() -> None:
    assert BOOL_SETTINGS == [
        "demo", "metrics_need_key", "no_mmap", "prewarm_default", "probe_load", "prompt_reuse",
    ]  # fmt: skip


@pytest.mark.parametrize("name", BOOL_SETTINGS)
def test_boolean_flag_pair_and_env(name: str) -> None:
    set_flag, clear_flag = bool_flags(name)
    default = getattr(Settings(), name)
    assert getattr(parse_flags(), name) is default
    assert getattr(parse_flags(set_flag), name) is True
    assert getattr(parse_flags(clear_flag), name) is False
    assert getattr(parse_flags(clear_flag, set_flag), name) is True  # the last flag wins
    env_name = "MODELD_" + name.upper()
    for raw, value in [("1", True), ("true", True), ("0", False), ("off", False)]:
        assert getattr(load_settings({}, env={env_name: raw}), name) is value
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    flags = vars(parser.parse_args([clear_flag]))
    assert getattr(load_settings(flags, env={env_name: "1"}), name) is False  # flag > env


def test_no_mmap_flags_read_as_documented() -> None:
    assert bool_flags("no_mmap") == ("--no-mmap", "--mmap")
    assert parse_flags("--no-mmap").no_mmap is True
    assert parse_flags("--mmap").no_mmap is False
    assert bool_flags("prewarm_default") == ("--prewarm-default", "--no-prewarm-default")


def test_probe_load_is_on_unless_turned_off() -> None:
    assert bool_flags("probe_load") == ("--probe-load", "--no-probe-load")
    assert parse_flags().probe_load is True
    assert parse_flags("--no-probe-load").probe_load is False
    assert load_settings({}, env={"MODELD_PROBE_LOAD": "0"}).probe_load is False


def test_the_state_dir_defaults_to_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert Settings().state_path == tmp_path / "modeld"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert Settings().state_path == Path("~/.local/state/modeld").expanduser()
    assert parse_flags("--state-dir", str(tmp_path)).state_path == tmp_path
