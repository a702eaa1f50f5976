"""loguru configured for JSON lines on stderr (one object per event)."""

from __future__ import annotations

import sys

from loguru import logger

__all__ = ["configure_logging"]

_LEVELS = {"trace", "debug", "info", "success", "warning", "error", "critical"}


def configure_logging(level: str = "info") -> None:
    """Replace loguru's default sink with a JSON-lines one at ``level``."""
    name = level.lower()
    if name not in _LEVELS:
        name = "info"
    logger.remove()
    logger.add(sys.stderr, level=name.upper(), serialize=True, backtrace=False, diagnose=False)
