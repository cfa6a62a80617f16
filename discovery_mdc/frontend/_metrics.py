"""Prometheus metrics of a frontend (one registry per watcher, so tests can run several)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

__all__ = ["FrontendMetrics"]


class FrontendMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = Counter("mdc_watch_events", "etcd watch events seen", ["type"], registry=r)
        self.rejected = Counter(
            "mdc_rejected_instances", "instances rejected by mdcsum", registry=r
        )
        self.malformed = Counter(
            "mdc_malformed_cards", "malformed or non-card keys skipped", registry=r
        )
        self.pipelines = Counter(
            "mdc_pipelines", "verify-and-cache pipelines run", ["result"], registry=r
        )
        self.bytes_fetched = Counter(
            "mdc_bytes_fetched", "metadata bytes fetched into the cache", registry=r
        )
        self.reconnects = Counter(
            "mdc_watch_reconnects", "watch reconnects after a failure", registry=r
        )
        self.relists = Counter(
            "mdc_relists", "full relists (compaction or reconcile)", ["reason"], registry=r
        )
        self.models = Gauge("mdc_models_ready", "models currently listed", registry=r)
        self.instances = Gauge("mdc_instances", "instances currently known", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
