"""What every HTTP response and lifecycle event leaves behind: a log line and metrics."""

from __future__ import annotations

from loguru import logger
from starlette.types import Scope

from modeld.api.context import context_of
from modeld.events import Event, GenerationFinished, ModelEvent, ModelFailed
from modeld.observability.metrics import Metrics

__all__ = ["AccessObserver", "log_event"]

_QUIET_PATHS = {"/healthz", "/readyz", "/metrics"}


class AccessObserver:
    """The HTTP middleware's observer: in-flight gauge, request metrics, access log."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def started(self, path: str) -> None:
        self._metrics.http_inflight.labels(path).inc()

    def finished(self, scope: Scope, path: str, status: int, duration_s: float) -> None:
        method = str(scope.get("method", ""))
        self._metrics.http_inflight.labels(path).dec()
        self._metrics.observe_http(path, method, status, duration_s)
        context = context_of(scope)
        log = logger.debug if path in _QUIET_PATHS else logger.info
        log(
            "request",
            request_id=context.request_id,
            method=method,
            path=scope.get("path"),
            route=path,
            status=status,
            latency_ms=round(duration_s * 1000, 3),
            model=context.model,
            queue_ms=context.queue_ms,
            key_id=context.key_id,
        )


def log_event(event: Event) -> None:
    """An EventHub listener: lifecycle events as log lines (never prompt text)."""
    if isinstance(event, ModelEvent):
        level = "WARNING" if isinstance(event, ModelFailed) else "INFO"
        logger.log(level, event.kind, **event.fields())
    elif isinstance(event, GenerationFinished):
        result, metrics = event.result, event.result.metrics
        logger.info(
            "generation finished",
            model=result.model,
            request_id=result.request_id,
            done_reason=str(result.done_reason),
            completion_tokens=metrics.completion_tokens,
            cached_tokens=metrics.cached_tokens,
            ttft_ms=metrics.ttft_ms,
            queue_ms=metrics.queue_ms,
            tokens_per_second=metrics.tokens_per_second,
        )
