"""Running the API under uvicorn, with an upload worker in the same process by default."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from wsgiref.simple_server import WSGIServer

import uvicorn

from vodpush.api.app import create_app
from vodpush.api.connections import server_config
from vodpush.metrics import start_metrics_server
from vodpush.service import Service
from vodpush.transfer.preflight import S3Preflight
from vodpush.worker.runner import Worker
from vodpush.worker.shutdown import SETTLE_SECONDS

log = logging.getLogger(__name__)

# Beyond the worker's own bound (grace + SETTLE_SECONDS): the database writes of its
# hand-back. Past it the worker thread (a daemon) is left behind and the process exits.
JOIN_MARGIN = 3.0


class _Server(uvicorn.Server):
    """uvicorn, telling the embedded worker to stop the moment the signal arrives: uvicorn
    passes the signal on only after its own graceful shutdown, and the worker's grace must
    run at the same time as the API's, not after it."""

    def __init__(self, config: uvicorn.Config, worker: Worker | None) -> None:
        super().__init__(config)
        self._worker = worker

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._worker is not None:
            self._worker.stop()


def run_server(service: Service, *, host: str, port: int, embedded_worker: bool = True) -> None:
    """Serve until SIGTERM/SIGINT; the embedded worker stops with the same grace period."""
    attach_preflight(service)
    app = create_app(service)
    metrics_server = _start_metrics(service, host)  # first: a busy port stops us here
    worker: Worker | None = None
    thread: threading.Thread | None = None
    if embedded_worker:
        worker = Worker(service)
        # In one process the API can wake the worker directly when it queues a request.
        service.requests.on_enqueue = worker.wake
        thread = threading.Thread(target=worker.run, name="worker", daemon=True)
        thread.start()
    config = server_config(app, service.settings, host=host, port=port)
    server = _Server(config, worker)
    log.info(
        "listening",
        extra={"action": "api.listen", "host": host, "port": port, "worker": embedded_worker},
    )

    # uvicorn re-raises the signal that stopped it once it is done; with these handlers in
    # place that re-raise lands here instead of killing the process before the worker has
    # released its uploads.
    def _stopping(signum: int, frame: object) -> None:
        if worker is not None:
            worker.stop()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _stopping)
        signal.signal(signal.SIGINT, _stopping)
    try:
        server.run()  # returns on SIGINT/SIGTERM
    finally:
        if metrics_server is not None:
            metrics_server.shutdown()
            metrics_server.server_close()
        if worker is not None and thread is not None:
            worker.stop()
            thread.join(service.settings.shutdown_grace + SETTLE_SECONDS + JOIN_MARGIN)
            if thread.is_alive():
                log.error(
                    "worker did not stop in time; exiting without it",
                    extra={"action": "worker.stop_timeout"},
                )
        service.close()


def attach_preflight(service: Service) -> None:
    """Give the API its preflight against S3 (aws.upload with preflight: true), unless it
    has one: the API does not load the S3 library itself."""
    if service.preflight is None:
        service.preflight = S3Preflight(
            timeout=service.settings.preflight_timeout,
            concurrency=service.settings.preflight_concurrency,
        )


def _start_metrics(service: Service, api_host: str) -> WSGIServer | None:
    """/metrics on its own address (VODPUSH_METRICS_PORT), when configured."""
    settings = service.settings
    if settings.metrics_port is None:
        return None
    token = settings.metrics_token
    return start_metrics_server(
        settings.metrics_host or api_host,
        settings.metrics_port,
        queue=service.queue,
        token=token.get_secret_value() if token is not None else None,
    )
