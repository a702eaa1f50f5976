"""The global log threshold: set at start-up and by a config reload, read by the log
filter. Kept here, below both the settings and the logging set-up, so that a reload
sets it without the settings importing observability."""

from __future__ import annotations

__all__ = [
    "DEBUG_LEVEL_NUMBER",
    "DEFAULT_LEVEL",
    "global_level_number",
    "level_number",
    "set_log_level",
]

_LEVELS = {"trace": 5, "debug": 10, "info": 20, "success": 25, "warning": 30, "error": 40}
DEFAULT_LEVEL = "info"
DEBUG_LEVEL_NUMBER = _LEVELS["debug"]
_global_level_no = [_LEVELS[DEFAULT_LEVEL]]  # set by configure_logging, changed by a reload


def level_number(name: str | None) -> int | None:
    """The numeric level for a name such as ``debug``; None when unknown."""
    return _LEVELS.get((name or "").strip().lower())


def set_log_level(level: str) -> None:
    """The global threshold (an unknown name means ``info``); a config reload calls it."""
    _global_level_no[0] = level_number(level) or _LEVELS[DEFAULT_LEVEL]


def global_level_number() -> int:
    return _global_level_no[0]
