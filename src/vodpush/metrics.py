"""Prometheus metrics of this process, and the queue depth read from the database at
scrape time. Outside the worker: the API serves /metrics without loading the S3 engine."""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from vodpush.core.requests import StoreUnavailable

log = logging.getLogger(__name__)

# A `_created` series beside every counter doubles what is scraped and stored and no
# dashboard reads it.
disable_created_metrics()

UPLOADS = Counter("vodpush_uploads_total", "Finished upload attempts by outcome", ["outcome"])
UPLOADED_BYTES = Counter("vodpush_uploaded_bytes_total", "Bytes of source files uploaded")
# Counted as the bytes are sent, not when an upload ends: rate() of it is the throughput.
BYTES_SENT = Counter(
    "vodpush_upload_bytes_sent_total", "Bytes sent to S3 by this process, as they are sent"
)
UPLOADS_IN_FLIGHT = Gauge("vodpush_uploads_in_flight", "Uploads this worker process is running now")
# Per account: only with VODPUSH_METRICS_PER_ACCOUNT (a series per account and outcome).
ACCOUNT_UPLOADS = Counter(
    "vodpush_account_uploads_total",
    "Finished upload attempts by account id and outcome (VODPUSH_METRICS_PER_ACCOUNT)",
    ["account", "outcome"],
)
ACCOUNT_BYTES = Counter(
    "vodpush_account_uploaded_bytes_total",
    "Bytes of source files uploaded by account id (VODPUSH_METRICS_PER_ACCOUNT)",
    ["account"],
)
UPLOAD_SECONDS = Histogram(
    "vodpush_upload_duration_seconds",
    "Duration of successful uploads",
    buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
CALLBACKS = Counter("vodpush_callbacks_total", "Callback delivery attempts by outcome", ["outcome"])
STORE_UNAVAILABLE = Counter(
    "vodpush_store_unavailable_total",
    "Database calls of the worker that met an error that passes (a lost or refused "
    "connection, a restart, SQLite busy), by operation; most are tried again",
    ["operation"],
)
# Set by the worker's reaper after each pass (worker.reaper).
ORPHANS_PENDING = Gauge(
    "vodpush_orphan_uploads",
    "Multipart uploads given up whose abort S3 has not confirmed yet, at the last reaper pass",
)
ORPHAN_ABORTS = Counter(
    "vodpush_orphan_aborts_total",
    "Aborts of orphaned multipart uploads by outcome (aborted: S3 confirmed; failed)",
    ["outcome"],
)


_per_account = False


def configure(*, per_account: bool) -> None:
    """Whether the per-account series are kept (their number grows with the accounts)."""
    global _per_account
    _per_account = per_account


def upload_finished(outcome: str, account_id: int, *, size: int | None = None) -> None:
    """One finished attempt: success, failure, retry or error (and the file's size on
    success)."""
    UPLOADS.labels(outcome).inc()
    if size is not None:
        UPLOADED_BYTES.inc(size)
    if _per_account:
        ACCOUNT_UPLOADS.labels(str(account_id), outcome).inc()
        if size is not None:
            ACCOUNT_BYTES.labels(str(account_id)).inc(size)


class QueueDepth(Protocol):
    """What the metrics need of the queue (core.ports.QueueStorePort)."""

    def depth(self, *, live_only: bool = False) -> dict[str, int]: ...

    def oldest_due_seconds(self) -> float: ...


class QueueDepthCollector(Collector):
    def __init__(self, queue: QueueDepth) -> None:
        self._queue = queue

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            # Live states only: counting every finished request of all time costs a scan
            # of the table at each scrape, and grows for ever.
            depth = self._queue.depth(live_only=True)
            oldest = self._queue.oldest_due_seconds()
        except StoreUnavailable:
            depth = None  # the process's own counters are still worth a scrape
        up = GaugeMetricFamily(
            "vodpush_database_up", "1 when the database answered this scrape, else 0"
        )
        up.add_metric([], 0 if depth is None else 1)
        yield up
        if depth is None:
            return
        gauge = GaugeMetricFamily(
            "vodpush_queue_depth", "Upload requests by state", labels=["state"]
        )
        for state, count in depth.items():
            gauge.add_metric([state], count)
        yield gauge
        age = GaugeMetricFamily(
            "vodpush_queue_oldest_due_seconds",
            "How long the longest-waiting due request (queued, or retrying past its time) "
            "has waited for a worker, by the database's clock; 0 when none waits",
        )
        age.add_metric([], oldest)
        yield age


def render(queue: QueueDepth) -> bytes:
    """This process's counters plus the shared queue depth."""
    depth = CollectorRegistry()
    depth.register(QueueDepthCollector(queue))
    return generate_latest(REGISTRY) + generate_latest(depth)


def authorized(header: str | None, token: str) -> bool:
    """Whether an Authorization header carries ``Bearer <token>``; the token is compared in
    constant time."""
    scheme, _, given = (header or "").strip().partition(" ")
    # Compared even when the scheme is wrong, so the answer takes the same time.
    same = hmac.compare_digest(
        given.strip().encode("utf-8", "replace"), token.encode("utf-8", "replace")
    )
    return same and scheme.lower() == "bearer"


class _Handler(WSGIRequestHandler):
    # A scraper that stops sending is cut off instead of holding its thread forever.
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        pass  # scrapes are not worth a log line each


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Server6(_Server):
    address_family = socket.AF_INET6


def start_metrics_server(
    host: str, port: int, *, queue: QueueDepth | None, token: str | None
) -> WSGIServer:
    """Serve /metrics on ``host:port`` in a daemon thread (shut it down with
    ``.shutdown()``): this process's counters, plus the queue depth when ``queue`` is given;
    with ``token``, only to requests that send it as a bearer token."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found\n"]
        if token is not None and not authorized(environ.get("HTTP_AUTHORIZATION"), token):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="metrics"')],
            )
            return [b"unauthorized\n"]
        body = render(queue) if queue is not None else generate_latest(REGISTRY)
        start_response(
            "200 OK", [("Content-Type", CONTENT_TYPE_LATEST), ("Content-Length", str(len(body)))]
        )
        return [body]

    server_class = _Server6 if ":" in host else _Server
    server = make_server(host, port, app, server_class=server_class, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    log.info(
        "metrics listening",
        extra={"action": "metrics.listen", "host": host, "port": port, "token": bool(token)},
    )
    return server
