"""OpenTelemetry traces (the ``otel`` extra): one server span per HTTP request, and for a
generation four children (queue wait, load, prompt evaluation, decode) carrying the model
id, request id, token counts and done reason. A W3C ``traceparent`` header makes the
request's span a child of the caller's.

Off unless configured the standard way (``OTEL_TRACES_EXPORTER``, or an
``OTEL_EXPORTER_OTLP_ENDPOINT``/``..._TRACES_ENDPOINT``); when off,
:func:`tracing_from_env` returns None, no middleware and no listener are installed, and
``opentelemetry`` is not even imported: requests pay nothing.

The children are written when the generation's result arrives, with explicit start and
end times derived from its metrics (durations exact, measured on the monotonic clock):
nothing is done per token, and the scheduler knows nothing of tracing.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

from modeld.api.context import context_of
from modeld.errors import ConfigError
from modeld.events import Event, GenerationFinished

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

__all__ = ["Tracing", "TracingMiddleware", "tracing_from_env"]

_NS = 1_000_000_000
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]


class Tracing:
    """Spans for requests and generations from one ``TracerProvider``.

    The middleware opens a request's span (keyed by request id); the ``GenerationFinished``
    listener adds the generation's children to it; the middleware ends it.
    """

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry import propagate, trace

        from modeld import __version__

        self.provider = provider
        self._tracer = provider.get_tracer("modeld", __version__)
        self._propagate = propagate
        self._trace = trace
        self._open: dict[str, Span] = {}

    def start_request(
        self, request_id: str, method: str, path: str, route: str, headers: Mapping[str, str]
    ) -> None:
        parent = self._propagate.extract(headers)  # W3C traceparent / tracestate
        span = self._tracer.start_span(
            f"{method} {route}",
            context=parent,
            kind=self._trace.SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": path,
                "http.route": route,
                "modeld.request_id": request_id,
            },
        )
        self._open[request_id] = span

    def end_request(self, request_id: str, status: int, model: str | None) -> None:
        span = self._open.pop(request_id, None)
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if model:
            span.set_attribute("modeld.model_id", model)
        if status >= 500:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
        span.end()

    def on_event(self, event: Event) -> None:
        """An EventHub listener: a finished generation's phases as child spans."""
        if not isinstance(event, GenerationFinished):
            return
        result = event.result
        span = self._open.get(result.request_id)
        if span is None:
            return
        metrics = result.metrics
        attributes: dict[str, str | int | float] = {
            "modeld.model_id": result.model,
            "modeld.request_id": result.request_id,
            "modeld.done_reason": str(result.done_reason),
            "gen_ai.request.model": result.model,
            "gen_ai.usage.input_tokens": metrics.prompt_tokens,
            "gen_ai.usage.output_tokens": metrics.completion_tokens,
            "modeld.ttft_ms": metrics.ttft_ms,
            "modeld.tokens_per_second": metrics.tokens_per_second,
        }
        span.set_attributes(attributes)
        if result.error:
            span.set_attribute("modeld.error_code", result.error.get("code", ""))
        context = self._trace.set_span_in_context(span)
        end_ns = int(event.time_unix * _NS)
        at_ns = end_ns - int(metrics.total_ms * 1_000_000)
        for name, duration_ms in (
            ("queue wait", metrics.queue_ms),
            ("load", metrics.load_ms),
            ("prompt eval", metrics.prompt_eval_ms),
            ("decode", metrics.eval_ms),
        ):
            child = self._tracer.start_span(
                name, context=context, start_time=at_ns, attributes=attributes
            )
            at_ns += int(duration_ms * 1_000_000)
            child.end(end_time=at_ns)

    def shutdown(self) -> None:
        """Export what is buffered (at exit)."""
        self.provider.shutdown()


class TracingMiddleware:
    """Pure ASGI (streams untouched): opens the request's span before the app runs and
    ends it once the response is over, whatever way it ends. Installed inside
    ``RequestContextMiddleware``, which sets the request id."""

    def __init__(self, app: ASGIApp, *, tracing: Tracing, route_of: Callable[[Scope], str]):
        self.app = app
        self.tracing = tracing
        self.route_of = route_of

    async def __call__(
        self,
        scope: Scope,
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = context_of(scope)
        request_id = context.request_id
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        method, path = str(scope["method"]), str(scope["path"])
        self.tracing.start_request(request_id, method, path, self.route_of(scope), headers)
        status = [500]

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.tracing.end_request(request_id, status[0], context.model)


def tracing_from_env(env: Mapping[str, str] | None = None) -> Tracing | None:
    """A :class:`Tracing` exporting as the ``OTEL_*`` variables say, or None when they
    configure nothing.

    Raises :class:`ConfigError` when tracing is asked for but the ``otel`` extra is not
    installed, or for an exporter or protocol modeld does not ship (no silent fallback).
    """
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")]
    names = [n for n in names if n]
    if not names and any(env.get(var) for var in _ENDPOINT_VARS):
        names = ["otlp"]
    if not names or names == ["none"]:
        return None
    try:
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
    except ImportError as exc:
        raise ConfigError(
            "OTEL_* variables ask for traces but the otel extra is not installed: "
            "pip install 'modeld[otel]'"
        ) from exc
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "modeld"}))
    provider = TracerProvider(resource=resource)  # reads OTEL_TRACES_SAMPLER* itself
    for name in names:
        if name == "otlp":
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(env)))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
        elif name != "none":
            raise ConfigError(
                f"OTEL_TRACES_EXPORTER={name!r}: modeld ships 'otlp' and 'console'",
                field="OTEL_TRACES_EXPORTER",
            )
    return Tracing(provider)


def _otlp_exporter(env: Mapping[str, str]) -> Any:
    protocol = next((env[var] for var in _PROTOCOL_VARS if env.get(var)), "http/protobuf")
    if protocol.strip().lower() != "http/protobuf":
        raise ConfigError(
            f"OTLP protocol {protocol!r}: modeld's otel extra exports http/protobuf",
            field="OTEL_EXPORTER_OTLP_PROTOCOL",
        )
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # endpoint, headers, timeout, compression: from OTEL_* itself
