"""The one holder of the settings in force: a reload swaps the whole Settings object
(so settings added later reload with no further work), keeps and reports the ones that
only a restart can change, and refuses a broken source without changing anything."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from modeld.errors import ConfigError
from modeld.observability.logging import prompt_logging_enabled, set_log_level
from modeld.settings.config import Settings, load_settings
from modeld.settings.live import RESTART_REQUIRED, LiveSettings


def test_every_restart_only_name_is_a_setting() -> None:
    fields = {f.name for f in msgspec.structs.fields(Settings)}
    assert fields >= RESTART_REQUIRED


@pytest.fixture
def log_level_restored() -> Iterator[None]:
    try:
        yield
    finally:
        set_log_level("info")


@pytest.mark.usefixtures("log_level_restored")
def test_reload_swaps_everything_that_may_change_live(tmp_path: Path) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text("max_queue_depth = 3\n")
    live = LiveSettings(
        load_settings({"config": str(config)}, env={}),
        lambda: load_settings({"config": str(config)}, env={}),
    )
    before = live.current
    # Every field that may change live, changed at once, plus two that may not.
    config.write_text(
        "max_queue_depth = 4\nmax_wait_ms = 10\ninfer_timeout = 5.0\nn_ctx = 512\n"
        "default_model = 'm.gguf'\nlog_level = 'debug'\nport = 9999\n"
        "allowed_hosts = ['example.org']\n"
    )
    outcome = live.reload()
    assert {c.name for c in outcome.applied} == {
        "max_queue_depth", "max_wait_ms", "infer_timeout", "n_ctx", "default_model", "log_level"
    }  # fmt: skip
    assert [(c.name, c.running, c.requested) for c in outcome.needs_restart] == [
        ("port", 8080, 9999),
        ("allowed_hosts", [], ["example.org"]),
    ]  # in the order of the Settings fields
    after = live.current
    assert after is not before
    assert (after.max_queue_depth, after.n_ctx, after.default_model) == (4, 512, "m.gguf")
    assert (after.port, after.allowed_hosts) == (8080, [])  # kept until a restart
    assert prompt_logging_enabled()  # the log level took effect at once
    assert outcome.to_builtins()["needs_restart"] == [
        {"setting": "port", "running": 8080, "requested": 9999},
        {"setting": "allowed_hosts", "running": [], "requested": ["example.org"]},
    ]
    assert live.reload().applied == ()  # nothing changed since: nothing to apply


@pytest.mark.parametrize(
    "text", ["max_queue_depth = = 1\n", "max_queue_depth = -1\n", "no_such_setting = 1\n"]
)
def test_a_broken_source_changes_nothing(tmp_path: Path, text: str) -> None:
    config = tmp_path / "modeld.toml"
    config.write_text("max_queue_depth = 3\n")
    live = LiveSettings(
        Settings(max_queue_depth=3), lambda: load_settings({"config": str(config)}, env={})
    )
    config.write_text(text)
    before = live.current
    with pytest.raises(ConfigError):
        live.reload()
    assert live.current is before


def test_without_a_source_a_reload_changes_nothing() -> None:
    live = LiveSettings(Settings(max_queue_depth=3))
    outcome = live.reload()
    assert (outcome.applied, outcome.needs_restart) == ((), ())
    assert live.current.max_queue_depth == 3
