"""The settings in force, held in one place and swapped whole when the config is reloaded.

Everything that reads a setting per request (the manager, its pool and loader, the API's
routes) reads it from :attr:`LiveSettings.current`, so a reload changes limits and
per-model settings for new requests without a restart, and settings added later are
reloaded with no further work. Some settings are used once at startup (the socket, the
budget, the middleware); :data:`RESTART_REQUIRED` lists them, and a reload that changes
one keeps the running value and reports it instead of silently ignoring it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from modeld.settings.config import Settings
from modeld.settings.log_level import set_log_level

__all__ = ["RESTART_REQUIRED", "LiveSettings", "ReloadOutcome", "SettingChange"]

# Settings read once at startup: a reload reports a change to one of these and keeps the
# running value. Everything else takes effect for new requests (and new loads).
RESTART_REQUIRED: frozenset[str] = frozenset(
    {
        "host",  # the listening socket
        "port",
        "idle_timeout",  # Hypercorn's connection timers
        "models_dir",  # the registry's directory
        "demo",  # it chooses the models dir
        "token_loop",  # loaded models keep the loop they were made with
        "vram_budget_mb",  # the budget is sized once
        "vram_margin_mb",
        "n_gpu_layers",  # decides GPU or CPU accounting at startup
        "allowed_hosts",  # the Host allowlist and CORS are built into the middleware
        "cors_origins",
        "prewarm_default",  # acts once, before serving
        "state_dir",  # the crash markers and probe verdicts are opened once
        "prompt_cache_mb",  # the prompt cache is sized and its directory opened once
        "prompt_cache_disk_mb",
        "prompt_cache_dir",
    }
)


@dataclass(frozen=True, slots=True)
class SettingChange:
    name: str
    running: object
    requested: object


@dataclass(frozen=True, slots=True)
class ReloadOutcome:
    """What a reload did: ``applied`` are in force for new requests; ``needs_restart``
    were changed in the sources but keep their running value until a restart."""

    applied: tuple[SettingChange, ...]
    needs_restart: tuple[SettingChange, ...]

    def to_builtins(self) -> dict[str, object]:
        return {
            "reloaded": True,
            "applied": [
                {"setting": c.name, "old": _plain(c.running), "new": _plain(c.requested)}
                for c in self.applied
            ],
            "needs_restart": [
                {"setting": c.name, "running": _plain(c.running), "requested": _plain(c.requested)}
                for c in self.needs_restart
            ],
        }


def _plain(value: object) -> object:
    return msgspec.to_builtins(value)


def _changes(old: Settings, new: Settings) -> list[SettingChange]:
    return [
        SettingChange(field.name, getattr(old, field.name), getattr(new, field.name))
        for field in msgspec.structs.fields(Settings)
        if getattr(old, field.name) != getattr(new, field.name)
    ]


class LiveSettings:
    """The one holder of the current :class:`Settings`.

    ``source`` re-reads every source (flags, environment, config file) the way startup
    did; without one, a reload has nothing to read and changes nothing.
    """

    def __init__(self, settings: Settings, source: Callable[[], Settings] | None = None) -> None:
        self._current = settings
        self._source = source

    @property
    def current(self) -> Settings:
        return self._current

    def read(self) -> Settings:
        """Read the sources again (file I/O: call it off the event loop).

        Raises :class:`~modeld.errors.ConfigError` naming the bad setting or file.
        """
        return self._source() if self._source is not None else self._current

    def apply(self, requested: Settings) -> ReloadOutcome:
        """Put into force what may change live; keep (and report) the rest."""
        changes = _changes(self._current, requested)
        applied = tuple(c for c in changes if c.name not in RESTART_REQUIRED)
        needs_restart = tuple(c for c in changes if c.name in RESTART_REQUIRED)
        kept = {c.name: c.running for c in needs_restart}
        self._current = msgspec.structs.replace(requested, **kept)
        if any(c.name == "log_level" for c in applied):
            set_log_level(self._current.log_level)
        return ReloadOutcome(applied, needs_restart)

    def reload(self) -> ReloadOutcome:
        """:meth:`read` then :meth:`apply`; a :class:`ConfigError` changes nothing."""
        return self.apply(self.read())
