"""loguru configured for JSON lines on stderr, with a per-request level override.

A request may ask for a more verbose threshold (``X-Log-Level: debug`` or ``?log=debug``);
prompts and generated text are only ever logged at debug, so they appear only when the
effective level (the global one, or the request's) is debug or lower.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson
from loguru import logger

__all__ = [
    "configure_logging",
    "level_number",
    "prompt_logging_enabled",
    "request_logging",
]

_LEVELS = {"trace": 5, "debug": 10, "info": 20, "success": 25, "warning": 30, "error": 40}
_DEFAULT = "info"
_global_level_no = [_LEVELS[_DEFAULT]]  # set once by configure_logging at startup
_request_level_no: ContextVar[int | None] = ContextVar("modeld_request_level_no", default=None)


def level_number(name: str | None) -> int | None:
    """The numeric level for a name such as ``debug``; None when unknown."""
    return _LEVELS.get((name or "").strip().lower())


def _effective_level_no() -> int:
    requested = _request_level_no.get()
    return min(_global_level_no[0], requested) if requested else _global_level_no[0]


def _filter(record: Any) -> bool:
    return bool(record["level"].no >= _effective_level_no())


def prompt_logging_enabled() -> bool:
    """Whether the current request may log prompts and generated text."""
    return _effective_level_no() <= _LEVELS["debug"]


@contextmanager
def request_logging(request_id: str, level_no: int | None) -> Iterator[None]:
    """Within the block, log lines carry ``request_id`` and honour the request's level."""
    token = _request_level_no.set(level_no)
    try:
        with logger.contextualize(request_id=request_id):
            yield
    finally:
        _request_level_no.reset(token)


class _JsonLineSink:
    """One flat JSON object per line: time, level, message, then the bound fields.

    It writes to its own duplicate of stderr's descriptor: llama-cpp-python points fd 2
    at /dev/null while a model loads (process-wide), which would otherwise swallow every
    log line written by other threads during a load.
    """

    def __init__(self) -> None:
        self._fd = os.dup(sys.stderr.fileno())

    def __call__(self, message: Any) -> None:
        record = message.record
        line = {
            "time": record["time"].isoformat(),
            "level": record["level"].name.lower(),
            "message": record["message"],
            **record["extra"],
        }
        if record["exception"] is not None:
            line["exception"] = repr(record["exception"].value)
        payload = orjson.dumps(line, default=str) + b"\n"
        while payload:
            payload = payload[os.write(self._fd, payload) :]


def configure_logging(level: str = _DEFAULT) -> None:
    """Replace loguru's default sink with a JSON-lines one on (a copy of) stderr."""
    _global_level_no[0] = level_number(level) or _LEVELS[_DEFAULT]
    logger.enable("modeld")
    logger.remove()
    logger.add(_JsonLineSink(), level=0, filter=_filter, backtrace=False, diagnose=False)
