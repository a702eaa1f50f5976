"""Prometheus metrics in modeld's own registry.

Counters and histograms are fed by events (HTTP responses, lifecycle events, finished
generations); gauges and per-model totals are read from ``ModelManager.statistics()``
snapshots at scrape time, so a scrape never races the scheduler.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from modeld.events import Event, GenerationFinished, ModelEvicted, ModelReady
from modeld.prompt_cache.metrics import prompt_cache_metrics
from modeld.sizes import MIB
from modeld.statistics import ManagerStatistics

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds, from sub-millisecond HTTP answers to ten-minute generations.
_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
    300, 600,
)  # fmt: skip
_TOKENS_PER_S_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000)


class _SnapshotCollector(Collector):
    """Gauges and totals taken from the manager's frozen snapshots at scrape time."""

    def __init__(self, statistics: Callable[[], ManagerStatistics]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._statistics()
        for name, value, doc in [
            ("modeld_budget_mb", stats.budget_mb, "memory budget for all instances"),
            ("modeld_margin_mb", stats.margin_mb, "memory kept free inside the budget"),
            ("modeld_used_est_mb", stats.used_est_mb, "memory charged to loaded instances"),
            ("modeld_admitted_requests", stats.admitted, "requests queued or streaming"),
        ]:
            yield GaugeMetricFamily(name, doc, value=value)
        queue_len = GaugeMetricFamily("modeld_queue_len", "queued requests", labels=["model"])
        inflight = GaugeMetricFamily("modeld_inflight", "running generations", labels=["model"])
        loaded = GaugeMetricFamily(
            "modeld_loaded_bytes", "bytes charged to the instance", labels=["model"]
        )
        for instance in stats.instances:
            queue_len.add_metric([instance.model_id], instance.queue_len)
            inflight.add_metric([instance.model_id], instance.inflight)
            loaded.add_metric([instance.model_id], instance.est_vram_mb * MIB)
        yield from (queue_len, inflight, loaded)
        loads = CounterMetricFamily("modeld_loads", "successful loads", labels=["model"])
        failures = CounterMetricFamily("modeld_load_failures", "failed loads", labels=["model"])
        evictions = CounterMetricFamily("modeld_evictions", "LRU evictions", labels=["model"])
        for counts in stats.counters:
            loads.add_metric([counts.model_id], counts.loads_total)
            failures.add_metric([counts.model_id], counts.load_failures_total)
            evictions.add_metric([counts.model_id], counts.evictions_total)
        yield from (loads, failures, evictions)
        yield from _crash_containment(stats)
        yield from prompt_cache_metrics(stats.prompt_cache)


def _crash_containment(
    stats: ManagerStatistics,
) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    guard = stats.crash_containment
    crashes = CounterMetricFamily(
        "modeld_crashes",
        "native crashes found at start-up: an earlier process died while llama.cpp ran on "
        "a model file",
        labels=["model", "stage"],
    )
    for model, stage, count in guard.crashes:
        crashes.add_metric([model, stage], count)
    probes = CounterMetricFamily(
        "modeld_probe_loads", "probe loads in a child process, by outcome", labels=["outcome"]
    )
    for outcome, count in sorted(guard.probes.items()):
        probes.add_metric([outcome], count)
    quarantined = GaugeMetricFamily(
        "modeld_quarantined_files", "model files refused until they change or are cleared",
        value=guard.quarantined_files,
    )  # fmt: skip
    yield from (crashes, probes, quarantined)


class Metrics:
    def __init__(self, statistics: Callable[[], ManagerStatistics]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "modeld_http_requests",
            "HTTP requests answered",
            ["path", "method", "status"],
            registry=self.registry,
        )
        self.http_duration = Histogram(
            "modeld_http_request_duration_seconds",
            "time to answer (streams: until the last byte)",
            ["path", "method", "status"],
            buckets=_LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.http_inflight = Gauge(
            "modeld_http_inflight_requests", "HTTP requests in progress", ["path"],
            registry=self.registry,
        )  # fmt: skip
        self.rejections = Counter(
            "modeld_rejections", "requests refused by backpressure", ["reason", "status"],
            registry=self.registry,
        )  # fmt: skip
        self.load_duration = Histogram(
            "modeld_load_duration_seconds", "model load and warm-up time", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.tokens_generated = Counter(
            "modeld_tokens_generated", "completion tokens generated", ["model"],
            registry=self.registry,
        )  # fmt: skip
        self.cached_prompt_tokens = Counter(
            "modeld_prompt_tokens_cached", "prompt tokens whose KV was reused, not evaluated",
            ["model"], registry=self.registry,
        )  # fmt: skip
        self.ttft = Histogram(
            "modeld_time_to_first_token_seconds", "arrival to first chunk", ["model"],
            buckets=_LATENCY_BUCKETS_S, registry=self.registry,
        )  # fmt: skip
        self.decode_rate = Histogram(
            "modeld_decode_tokens_per_second", "decode speed per generation", ["model"],
            buckets=_TOKENS_PER_S_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.generations = Counter(
            "modeld_generations", "finished generations", ["model", "done_reason"],
            registry=self.registry,
        )  # fmt: skip
        self.unloads = Counter(
            "modeld_unloads", "instances unloaded, by why (evicted, idle, shutdown)",
            ["model", "reason"], registry=self.registry,
        )  # fmt: skip
        self.registry.register(_SnapshotCollector(statistics))

    def on_event(self, event: Event) -> None:
        """An EventHub listener."""
        if isinstance(event, ModelReady):
            self.load_duration.labels(event.model).observe(event.load_ms / 1000)
        elif isinstance(event, ModelEvicted):
            self.unloads.labels(event.model, str(event.reason)).inc()
        elif isinstance(event, GenerationFinished):
            result, metrics = event.result, event.result.metrics
            self.generations.labels(result.model, str(result.done_reason)).inc()
            self.tokens_generated.labels(result.model).inc(metrics.completion_tokens)
            self.cached_prompt_tokens.labels(result.model).inc(metrics.cached_tokens)
            if metrics.ttft_ms > 0:
                self.ttft.labels(result.model).observe(metrics.ttft_ms / 1000)
            if metrics.tokens_per_second > 0:
                self.decode_rate.labels(result.model).observe(metrics.tokens_per_second)

    def observe_http(self, path: str, method: str, status: int, duration_s: float) -> None:
        labels = (path, method, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_duration.labels(*labels).observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
