"""OpenTelemetry traces: a server span per request whose children are the generation's
queue wait, load, prompt evaluation and decode (durations equal to the terminal line's
metrics), a W3C ``traceparent`` honoured, OTLP export configured by ``OTEL_*`` alone,
and nothing at all when it is not configured.

In-process tests serve the real app on Hypercorn and a real port and read the spans from
the SDK's in-memory exporter; the end-to-end test runs ``modeld serve`` with only the
environment variables and receives its OTLP/HTTP export."""

from __future__ import annotations

import gzip
import itertools
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from modeld.api.app import create_app
from modeld.errors import ConfigError
from modeld.observability.tracing import Tracing, TracingMiddleware, tracing_from_env
from modeld.settings.config import load_settings
from tests.support.http import ndjson, poll
from tests.support.operator import serving
from tests.support.server import start_modeld

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
PHASES = ["queue wait", "load", "prompt eval", "decode"]
MS = 1_000_000  # ns


@pytest.fixture
def traced(models_dir: Path) -> Iterator[tuple[str, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    flags = {"models_dir": str(models_dir), "threads": "1", "n_ctx": "256"}
    app = create_app(load_settings(flags, env={}), tracing=Tracing(provider))
    with serving(app) as url:
        yield url, exporter
    provider.shutdown()


def _spans(exporter: InMemorySpanExporter, count: int) -> list[ReadableSpan]:
    """The finished spans once there are ``count`` (the server span ends just after the
    response's last byte, so the client can be a moment ahead), without the spans of
    the readiness probes (which may also end late)."""

    def finished() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name != "GET /healthz"]

    return poll(finished, lambda spans: len(spans) >= count)


def _check_generation(spans: list[ReadableSpan], terminal: dict[str, object]) -> ReadableSpan:
    (root,) = [s for s in spans if s.parent is None or s.kind is SpanKind.SERVER]
    children = sorted((s for s in spans if s is not root), key=lambda s: s.start_time or 0)
    assert [c.name for c in children] == PHASES
    metrics = terminal["metrics"]
    assert isinstance(metrics, dict)
    durations = [metrics[k] for k in ("queue_ms", "load_ms", "prompt_eval_ms", "eval_ms")]
    for child, duration_ms in zip(children, durations, strict=True):
        assert child.parent is not None
        assert child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
        assert child.start_time is not None
        assert child.end_time is not None
        assert abs((child.end_time - child.start_time) / MS - duration_ms) < 0.01
    for before, after in itertools.pairwise(children):
        assert before.end_time == after.start_time  # one phase after the other
    # The phases lie inside the request's span (two clocks: a few ms of slack).
    assert root.start_time is not None
    assert root.end_time is not None
    assert children[0].start_time is not None
    assert children[-1].end_time is not None
    assert root.start_time - 5 * MS <= children[0].start_time
    assert children[-1].end_time <= root.end_time + 5 * MS
    attributes = root.attributes or {}
    assert attributes["modeld.request_id"] == terminal["request_id"]
    assert attributes["modeld.model_id"] == terminal["model"]
    assert attributes["modeld.done_reason"] == terminal["done_reason"]
    assert attributes["gen_ai.usage.input_tokens"] == metrics["prompt_tokens"]
    assert attributes["gen_ai.usage.output_tokens"] == metrics["completion_tokens"]
    assert children[-1].attributes == {k: v for k, v in attributes.items() if k in
                                       children[-1].attributes}  # fmt: skip
    return root


def test_a_streamed_request_continues_the_callers_trace(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    url, exporter = traced
    headers = {"traceparent": TRACEPARENT, "X-Request-ID": "traced-1"}
    body = {"model": "tiny-a.gguf", "prompt": "hello", "max_tokens": 9}
    response = httpx.post(url + "/infer", json=body, headers=headers, timeout=60)
    terminal = ndjson(response.text)[-1]
    root = _check_generation(_spans(exporter, 5), terminal)
    assert root.name == "POST /infer"
    assert root.kind is SpanKind.SERVER
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None
    assert format(root.parent.span_id, "016x") == PARENT_ID
    assert root.parent.is_remote
    attributes = root.attributes or {}
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.route"] == "/infer"
    assert attributes["modeld.request_id"] == "traced-1"
    assert terminal["done_reason"] == "length"
    assert attributes["gen_ai.usage.output_tokens"] == 9


def test_without_traceparent_a_new_trace_and_every_request_has_a_span(
    traced: tuple[str, InMemorySpanExporter],
) -> None:
    url, exporter = traced
    body = {"model": "tiny-b.gguf", "prompt": "hi", "max_tokens": 4, "stream": False}
    answer = httpx.post(url + "/infer", json=body, timeout=60).json()
    root = _check_generation(_spans(exporter, 5), answer)
    assert root.parent is None
    exporter.clear()
    assert httpx.get(url + "/status").status_code == 200
    missing = httpx.post(url + "/infer", json={"model": "nope.gguf", "prompt": "x"})
    assert missing.status_code == 404
    status_span, missing_span = _spans(exporter, 2)
    assert status_span.name == "GET /status"
    assert missing_span.name == "POST /infer"
    assert (missing_span.attributes or {})["http.response.status_code"] == 404
    assert "modeld.done_reason" not in (missing_span.attributes or {})  # it never ran
    assert len(_spans(exporter, 2)) == 2  # no phases without a generation


def test_off_unless_configured() -> None:
    assert tracing_from_env({}) is None
    assert tracing_from_env({"OTEL_TRACES_EXPORTER": "none"}) is None
    on = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:1"}
    assert tracing_from_env({**on, "OTEL_SDK_DISABLED": "true"}) is None
    for env, service in (
        (on, "modeld"),
        ({"OTEL_TRACES_EXPORTER": "console"}, "modeld"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:1/v1/traces"}, "modeld"),
    ):
        tracing = tracing_from_env(env)
        assert tracing is not None, env
        assert tracing.provider.resource.attributes["service.name"] == service
        tracing.shutdown()
    with pytest.raises(ConfigError, match="modeld ships 'otlp' and 'console'"):
        tracing_from_env({"OTEL_TRACES_EXPORTER": "zipkin"})
    with pytest.raises(ConfigError, match="exports http/protobuf"):
        tracing_from_env({**on, "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"})


def test_without_tracing_no_hook_is_installed_and_otel_is_never_imported(
    models_dir: Path,
) -> None:
    app = create_app(load_settings({"models_dir": str(models_dir)}, env={}))
    assert all(m.cls is not TracingMiddleware for m in app.user_middleware)
    code = (
        "import sys, modeld.server, modeld.cli; "
        "from modeld.observability.tracing import tracing_from_env; "
        "assert tracing_from_env({}) is None; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class OtlpReceiver(ThreadingHTTPServer):
    """An OTLP/HTTP trace endpoint: keeps every export request it is sent."""

    def __init__(self) -> None:
        self.exports: list[ExportTraceServiceRequest] = []
        super().__init__(("127.0.0.1", 0), _OtlpHandler)


class _OtlpHandler(BaseHTTPRequestHandler):
    server: OtlpReceiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        assert self.path == "/v1/traces"
        assert self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.server.exports.append(request)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_otlp_export_configured_by_environment_alone(models_dir: Path, tmp_path: Path) -> None:
    with OtlpReceiver() as receiver:
        threading.Thread(target=receiver.serve_forever, daemon=True).start()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.server_address[1]}",
            "OTEL_SERVICE_NAME": "modeld-under-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
        }
        server = start_modeld(models_dir, tmp_path, "--threads", "1", "--n-ctx", "256", env=env)
        try:
            with server.client() as client:
                body = {"model": "tiny-a.gguf", "prompt": "hello", "max_tokens": 5}
                response = client.post("/infer", json=body, headers={"traceparent": TRACEPARENT})
                terminal = ndjson(response.text)[-1]
        finally:
            assert server.stop() == 0  # the exit flushes the batch
        receiver.shutdown()
    spans = [
        (resource_spans.resource, span)
        for export in receiver.exports
        for resource_spans in export.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    by_name = {span.name: span for _, span in spans}
    assert set(by_name) >= {"POST /infer", *PHASES}
    root = by_name["POST /infer"]
    assert root.trace_id.hex() == TRACE_ID
    assert root.parent_span_id.hex() == PARENT_ID
    for phase in PHASES:
        assert by_name[phase].parent_span_id == root.span_id
    attributes = {a.key: a.value for a in root.attributes}
    assert attributes["modeld.request_id"].string_value == terminal["request_id"]
    assert attributes["gen_ai.usage.output_tokens"].int_value == 5
    resource = {a.key: a.value.string_value for a in spans[0][0].attributes}
    assert resource["service.name"] == "modeld-under-test"
    serving_line = next(
        json.loads(line) for line in server.log().splitlines() if "modeld serving" in line
    )
    assert serving_line["tracing"] is True
