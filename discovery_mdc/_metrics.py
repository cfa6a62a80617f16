"""Prometheus plumbing shared by both halves: one exposition (same content type, no
``_created`` series), the standard series (``process_*``, ``discovery_mdc_build_info``), and a
plain duration accumulator for histograms that live outside a registry."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from importlib.metadata import PackageNotFoundError, version
from typing import Final

from aiohttp import web
from prometheus_client import CollectorRegistry, Info, ProcessCollector, generate_latest
from prometheus_client.core import HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.utils import floatToGoString

__all__ = [
    "CONTENT_TYPE",
    "SECONDS_BUCKETS",
    "Durations",
    "add_standard_collectors",
    "metrics_response",
    "package_version",
    "render",
]

#: The /metrics content type of both halves (Prometheus text format 0.0.4).
CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
#: Histogram buckets (seconds) for fetches, pipelines and registrations.
SECONDS_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def package_version() -> str:
    try:
        return version("discovery-mdc")
    except PackageNotFoundError:  # running from a source tree without metadata
        from discovery_mdc import __version__

        return __version__


def add_standard_collectors(registry: CollectorRegistry) -> None:
    """``process_*`` (CPU, memory, open fds, start time) and ``discovery_mdc_build_info``."""
    ProcessCollector(registry=registry)
    Info("discovery_mdc_build", "discovery-mdc build", registry=registry).info(
        {"version": package_version()}
    )


class _WithoutCreated:
    """A registry view whose metrics carry no ``*_created`` samples (they double every
    counter's series and say nothing an alert uses)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():
            metric.samples = [s for s in metric.samples if not s.name.endswith("_created")]
            yield metric


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format, without ``_created`` series."""
    return generate_latest(_WithoutCreated(registry))


def metrics_response(registry: CollectorRegistry) -> web.Response:
    """``GET /metrics`` for either half."""
    response = web.Response(body=render(registry))
    response.headers["Content-Type"] = CONTENT_TYPE
    return response


class Durations:
    """Bucket counts, sum and count of observed durations (thread-safe); exported as a
    histogram by a collector that reads it at scrape time."""

    def __init__(self, buckets: tuple[float, ...] = SECONDS_BUCKETS) -> None:
        self.buckets = buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._sum += seconds
            for i, bound in enumerate(self.buckets):
                if seconds <= bound:
                    self._counts[i] += 1
                    break
            else:
                self._counts[-1] += 1

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def family(self, name: str, documentation: str) -> HistogramMetricFamily:
        """The histogram as a metric family (cumulative buckets)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for bound, n in zip([*map(floatToGoString, self.buckets), "+Inf"], counts, strict=True):
            running += n
            cumulative.append((bound, float(running)))
        return HistogramMetricFamily(name, documentation, buckets=cumulative, sum_value=total)
