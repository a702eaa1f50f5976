"""loguru configured for JSON lines on stderr, with a per-request level override.

A request may ask for a more verbose threshold (``X-Log-Level: debug`` or ``?log=debug``);
prompts and generated text are only ever logged at debug, so they appear only when the
effective level (the global one, or the request's) is debug or lower.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import orjson
from loguru import logger

from modeld.settings.log_level import (
    DEBUG_LEVEL_NUMBER,
    DEFAULT_LEVEL,
    global_level_number,
    level_number,
    set_log_level,
)

__all__ = [
    "LoopErrorLog",
    "configure_logging",
    "level_number",
    "prompt_logging_enabled",
    "request_logging",
    "set_log_level",
]

_request_level_no: ContextVar[int | None] = ContextVar("modeld_request_level_no", default=None)


def _effective_level_no() -> int:
    requested, global_no = _request_level_no.get(), global_level_number()
    return min(global_no, requested) if requested else global_no


def _filter(record: Any) -> bool:
    return bool(record["level"].no >= _effective_level_no())


def prompt_logging_enabled() -> bool:
    """Whether the current request may log prompts and generated text."""
    return _effective_level_no() <= DEBUG_LEVEL_NUMBER


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
            error = record["exception"].value
            line["exception"] = repr(error)
            line["traceback"] = "".join(traceback.format_exception(error)).rstrip()
        payload = orjson.dumps(line, default=str) + b"\n"
        while payload:
            payload = payload[os.write(self._fd, payload) :]


def configure_logging(level: str = DEFAULT_LEVEL) -> None:
    """Replace loguru's default sink with a JSON-lines one on (a copy of) stderr."""
    set_log_level(level)
    logger.enable("modeld")
    logger.remove()
    logger.add(_JsonLineSink(), level=0, filter=_filter, backtrace=False, diagnose=False)


class LoopErrorLog:
    """asyncio's exception handler: JSON log lines, each message at most once per
    ``every_s`` (with the count it stood for), instead of one raw traceback each time.

    Out of descriptors, asyncio's accept loop reports every failed accept; unthrottled
    that was about a thousand tracebacks a second.
    """

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._every_s = every_s
        self._clock = clock
        self._last_s: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, loop: object, context: dict[str, Any]) -> None:
        detail = str(context.get("message") or "event loop error")[:200]
        now_s = self._clock()
        last_s = self._last_s.get(detail)
        if last_s is not None and now_s - last_s < self._every_s:
            self._suppressed[detail] = self._suppressed.get(detail, 0) + 1
            return
        if len(self._last_s) >= 256:  # the messages are a small fixed set; stay bounded
            self._last_s.clear()
        self._last_s[detail] = now_s
        error = context.get("exception")
        logger.error(
            "event loop error",
            detail=detail,
            error=repr(error) if error is not None else None,
            suppressed=self._suppressed.pop(detail, 0),
        )
