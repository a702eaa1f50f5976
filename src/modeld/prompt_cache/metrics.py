"""The prompt cache's Prometheus families, read from its statistics at scrape time."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from modeld.prompt_cache.cache import CacheStatistics

__all__ = ["prompt_cache_metrics"]


def prompt_cache_metrics(
    stats: CacheStatistics | None,
) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
    if stats is None or not stats.enabled:
        return
    for family, name, doc, memory, disk in [
        (GaugeMetricFamily, "bytes", "sequence states held, by tier", stats.memory_bytes,
         stats.disk_bytes),
        (GaugeMetricFamily, "bound_bytes", "each tier's bound (memory: what it may use now, "
         "within the budget's free memory)", stats.memory_allowed_bytes, stats.disk_bound_bytes),
        (GaugeMetricFamily, "entries", "sequence states held, by tier", stats.memory_entries,
         stats.disk_entries),
        (CounterMetricFamily, "hits", "restores, by the tier that served them",
         stats.hits_memory, stats.hits_disk),
    ]:  # fmt: skip
        by_tier = family(f"modeld_prompt_cache_{name}", doc, labels=["tier"])
        by_tier.add_metric(["memory"], memory)
        by_tier.add_metric(["disk"], disk)
        yield by_tier
    pending = GaugeMetricFamily(
        "modeld_prompt_cache_write_pending_bytes",
        "states waiting for the disk writer (counted in the memory bound)",
        value=stats.disk_pending_bytes,
    )
    yield pending
    for name, value, doc in [
        ("misses", stats.misses, "generations the cache had nothing better for"),
        ("saves", stats.saves, "sequence states saved"),
        ("restored_tokens", stats.restored_tokens, "prompt tokens restored, not evaluated"),
        ("restore_failures", stats.restore_failures, "states llama.cpp refused"),
        ("invalid_removed", stats.invalid_removed, "disk entries removed as unusable"),
        ("given_way_bytes", stats.given_way_bytes, "bytes dropped to make room for models"),
        ("restore_seconds", stats.restore_seconds, "time spent restoring states"),
        ("save_seconds", stats.save_seconds, "model threads' time saving states"),
        ("writes", stats.disk_writes, "disk entries written (off the model threads)"),
        ("writes_dropped", stats.disk_writes_dropped, "disk writes dropped (no room, shutdown)"),
        ("write_seconds", stats.disk_write_seconds, "the disk writer's time writing entries"),
    ]:
        yield CounterMetricFamily(f"modeld_prompt_cache_{name}", doc, value=value)
