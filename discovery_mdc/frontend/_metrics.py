"""Prometheus metrics of a frontend (one registry per watcher, so tests can run several)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from discovery_mdc._metrics import SECONDS_BUCKETS, add_standard_collectors, render
from discovery_mdc.cache import CacheStats
from discovery_mdc.etcd import PrefixInformer
from discovery_mdc.frontend._state import ModelStats

__all__ = ["FrontendMetrics"]

# What the cache series show before a cache is attached.
_NO_CACHE = CacheStats()


class _CacheStatsCollector(Collector):
    """Reads the cache's counters at scrape time, so nothing has to copy them over."""

    def __init__(self, stats: Callable[[], CacheStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield from _counters(
            ("discovery_mdc_fetched_bytes", "metadata bytes fetched into the cache",
             s.bytes_fetched),
            ("discovery_mdc_blob_fetches", "blobs fetched and published into the cache",
             s.fetches),
            ("discovery_mdc_blob_hits", "blobs already in the cache and verified", s.hits),
            ("discovery_mdc_blob_failures", "blob fetches or verifications that failed",
             s.failures),
            ("discovery_mdc_blob_repairs", "corrupt blobs found in the cache and fetched again",
             s.repairs),
        )  # fmt: skip
        by_source = CounterMetricFamily(
            "discovery_mdc_source_fetches",
            "metadata fetches by source (host:port, or the scheme for file/hf) and result",
            labels=["source", "result"],
        )
        for (source, result), n in sorted(s.by_source.items()):
            by_source.add_metric([source, result], n)
        yield by_source
        yield s.fetch_seconds.family(
            "discovery_mdc_blob_fetch_seconds",
            "time to fetch and verify one blob into the cache (all its attempts), seconds",
        )


def _counters(*rows: tuple[str, str, float]) -> Iterator[CounterMetricFamily]:
    """One counter family without labels per ``(name, help, value)``."""
    for name, doc, value in rows:
        yield CounterMetricFamily(name, doc, value=value)


def _labelled(name: str, doc: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, n in values.items():
        family.add_metric([key], n)
    return family


class _InformerCollector(Collector):
    """The etcd informer's counters, read at scrape time."""

    def __init__(self, informer: Callable[[], PrefixInformer | None]) -> None:
        self._informer = informer

    def collect(self) -> Iterator[Metric]:
        informer = self._informer()
        if informer is None:
            return
        s = informer.stats
        yield _labelled(
            "discovery_mdc_watch_events",
            "etcd watch events seen",
            "type",
            {"put": s.events_put, "delete": s.events_delete},
        )
        yield _labelled(
            "discovery_mdc_relists",
            "full relists (start, compaction, reconcile, history_lost)",
            "reason",
            s.relists,
        )
        yield _labelled(
            "discovery_mdc_reconcile_checks",
            "etcd reads by reconciles: quick check, exact (pinned) check, keys-only listing, "
            "value fetch",
            "kind",
            s.checks,
        )
        yield _labelled(
            "discovery_mdc_reconcile_repairs",
            "changes a reconcile found that the watch never delivered",
            "kind",
            s.repairs,
        )
        yield from _counters(
            ("discovery_mdc_watch_reconnects", "watch reconnects after a failure or a silent "
             "watch", s.reconnects),
            ("discovery_mdc_reconcile_read_bytes", "response bytes read from etcd by reconciles",
             s.reconcile_bytes),
            ("discovery_mdc_reconcile_failures", "reconciles that failed", s.reconcile_failures),
        )  # fmt: skip
        yield GaugeMetricFamily(
            "discovery_mdc_watch_silence_seconds",
            "seconds since the etcd watch last delivered anything (events or progress)",
            value=informer.silence(),
        )


class _ModelCollector(Collector):
    """Per-model series, read from the registry at scrape time (a model that is gone has no
    series left behind)."""

    def __init__(self, models: Callable[[], Iterable[ModelStats]]) -> None:
        self._models = models

    def collect(self) -> Iterator[Metric]:
        ready = GaugeMetricFamily(
            "discovery_mdc_model_ready",
            "1 while the model is listed on /v1/models, 0 while it is known but not ready",
            labels=["model"],
        )
        instances = GaugeMetricFamily(
            "discovery_mdc_model_instances",
            "instances admitted for the model (ready or being prepared)",
            labels=["model"],
        )
        rejected = GaugeMetricFamily(
            "discovery_mdc_model_rejected_instances",
            "instances of the model currently rejected by the mdcsum gate",
            labels=["model"],
        )
        for m in self._models():
            ready.add_metric([m.name], 1.0 if m.ready else 0.0)
            instances.add_metric([m.name], m.instances)
            rejected.add_metric([m.name], m.rejected)
        yield from (ready, instances, rejected)


class FrontendMetrics:
    """Counters for rejections, malformed cards and pipelines; the pipeline duration;
    per-model readiness (see :meth:`track_models`); the ``process_*`` and build-info series.
    The watch, relist and reconcile counters come from the attached informer, and the cache
    byte, blob and per-source counters and the per-blob fetch duration from ``stats()`` if
    given, else from the attached cache's counters (:meth:`attach_cache`; zero until then)."""

    def __init__(self, stats: Callable[[], CacheStats] | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._informer: PrefixInformer | None = None
        self._cache_stats = stats
        self.rejected = Counter(
            "discovery_mdc_rejected_instances",
            "instances rejected by mdcsum, or for a model id /v1/models/{id} cannot serve, "
            "by model",
            ["model"],
            registry=r,
        )
        self.malformed = Counter(
            "discovery_mdc_malformed_cards", "malformed or non-card keys skipped", registry=r
        )
        self.pipelines = Counter(
            "discovery_mdc_pipelines", "verify-and-cache pipelines run", ["result"], registry=r
        )
        self.pipeline_seconds = Histogram(
            "discovery_mdc_pipeline_seconds",
            "from a card's put seen to its model ready (verify-and-cache and prepare), seconds",
            buckets=SECONDS_BUCKETS,
            registry=r,
        )
        self.models = Gauge("discovery_mdc_models_ready", "models currently listed", registry=r)
        self.instances = Gauge("discovery_mdc_instances", "instances currently known", registry=r)
        r.register(_CacheStatsCollector(self._read_cache_stats))
        r.register(_InformerCollector(lambda: self._informer))
        add_standard_collectors(r)
        # Export the label values that matter at 0, so a scrape shows them before they happen.
        for result in ("ok", "failed"):
            self.pipelines.labels(result)

    def attach(self, informer: PrefixInformer) -> None:
        """Export ``informer``'s watch, relist and reconcile counters."""
        self._informer = informer

    def attach_cache(self, stats: CacheStats) -> None:
        """Export a cache's counters (the watcher calls this with its cache's), unless
        ``stats`` was given to the constructor."""
        if self._cache_stats is None:
            self._cache_stats = lambda: stats

    def _read_cache_stats(self) -> CacheStats:
        return _NO_CACHE if self._cache_stats is None else self._cache_stats()

    def track_models(self, models: Callable[[], Iterable[ModelStats]]) -> None:
        """Export ``discovery_mdc_model_{ready,instances,rejected_instances}{model}`` from
        ``models()`` at every scrape (the watcher calls this with its registry)."""
        self.registry.register(_ModelCollector(models))

    def render(self) -> bytes:
        return render(self.registry)
