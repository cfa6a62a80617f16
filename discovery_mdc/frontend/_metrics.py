"""Prometheus metrics of a frontend (one registry per watcher, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from discovery_mdc.cache import CacheStats, cache_stats

__all__ = ["FrontendMetrics"]


class _CacheStatsCollector(Collector):
    """Reads the cache's counters at scrape time, so nothing has to copy them over."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        s = self._stats()
        yield CounterMetricFamily(
            "discovery_mdc_bytes_fetched",
            "metadata bytes fetched into the cache",
            value=s.bytes_fetched,
        )
        yield CounterMetricFamily(
            "discovery_mdc_blob_fetches",
            "blobs fetched and published into the cache",
            value=s.fetches,
        )
        yield CounterMetricFamily(
            "discovery_mdc_blob_hits", "blobs already in the cache and verified", value=s.hits
        )
        yield CounterMetricFamily(
            "discovery_mdc_blob_failures",
            "blob fetches or verifications that failed",
            value=s.failures,
        )


class FrontendMetrics:
    """Counters for watch events, rejections, malformed cards, pipelines, reconnects and
    relists; cache byte and blob counters come from ``stats`` (the process-wide
    :func:`~discovery_mdc.cache.cache_stats` by default)."""

    def __init__(self, stats: Callable[[], CacheStats] = cache_stats) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter(
            "discovery_mdc_watch_events", "etcd watch events seen", ["type"], registry=r
        )
        self.rejected = Counter(
            "discovery_mdc_rejected_instances", "instances rejected by mdcsum", registry=r
        )
        self.malformed = Counter(
            "discovery_mdc_malformed_cards", "malformed or non-card keys skipped", registry=r
        )
        self.pipelines = Counter(
            "discovery_mdc_pipelines", "verify-and-cache pipelines run", ["result"], registry=r
        )
        self.reconnects = Counter(
            "discovery_mdc_watch_reconnects", "watch reconnects after a failure", registry=r
        )
        self.relists = Counter(
            "discovery_mdc_relists",
            "full relists (start, compaction or reconcile)",
            ["reason"],
            registry=r,
        )
        self.models = Gauge("discovery_mdc_models_ready", "models currently listed", registry=r)
        self.instances = Gauge("discovery_mdc_instances", "instances currently known", registry=r)
        r.register(_CacheStatsCollector(stats))
        # Export the label values that matter at 0, so a scrape shows them before they happen.
        for kind in ("put", "delete"):
            self.events.labels(kind)
        for result in ("ok", "failed"):
            self.pipelines.labels(result)
        for reason in ("start", "compaction", "reconcile"):
            self.relists.labels(reason)

    def render(self) -> bytes:
        return generate_latest(self.registry)
