"""Prometheus metrics of this process, and the queue depth read from the database at
scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vodpush.persistence.queue import QueueStore

UPLOADS = Counter("vodpush_uploads_total", "Finished upload attempts by outcome", ["outcome"])
UPLOADED_BYTES = Counter("vodpush_uploaded_bytes_total", "Bytes of source files uploaded")
UPLOAD_SECONDS = Histogram(
    "vodpush_upload_duration_seconds",
    "Duration of successful uploads",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
CALLBACKS = Counter("vodpush_callbacks_total", "Callback delivery attempts by outcome", ["outcome"])


class QueueDepthCollector(Collector):
    def __init__(self, queue: QueueStore) -> None:
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "vodpush_queue_depth", "Upload requests by state", labels=["state"]
        )
        for state, count in self._queue.depth().items():
            gauge.add_metric([state], count)
        yield gauge


def render(queue: QueueStore) -> bytes:
    """This process's counters plus the shared queue depth."""
    depth = CollectorRegistry()
    depth.register(QueueDepthCollector(queue))
    return generate_latest(REGISTRY) + generate_latest(depth)
