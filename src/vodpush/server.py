"""Running the API under uvicorn, with an upload worker in the same process by default."""

from __future__ import annotations

import errno
import logging
import signal
import socket
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any
from wsgiref.simple_server import WSGIServer

import uvicorn
from pydantic import SecretStr

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
# uvicorn's default backlog of pending connections.
LISTEN_BACKLOG = 2048


class CannotListen(Exception):
    """The API's (or /metrics') address cannot be listened on: the port is taken, the
    address is not this host's, or binding it needs privileges."""


def listen(host: str, port: int, *, what: str = "the API") -> socket.socket:
    """A socket bound to ``host:port`` and listening (port 0: a free port); CannotListen
    with the reason in one line otherwise. Listening at once makes a second process on the
    same port fail here, not later inside uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # As uvicorn does: a restart may bind while old connections linger in TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(LISTEN_BACKLOG)
    except OSError as exc:
        sock.close()
        raise CannotListen(_listen_failure(what, host, port, exc)) from exc
    return sock


def _listen_failure(what: str, host: str, port: int, exc: OSError) -> str:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    reason = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        reason = "the port is in use (another vodpush?); choose another with --port"
    elif exc.errno == errno.EACCES:
        reason = "permission denied (ports below 1024 need privileges)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "the address is not one of this host's"
    return f"cannot listen for {what} on {where}: {reason}"


class _Server(uvicorn.Server):
    """uvicorn, telling the embedded worker to stop the moment the signal arrives: uvicorn
    passes the signal on only after its own graceful shutdown, and the worker's grace must
    run at the same time as the API's, not after it. ``on_started`` runs once uvicorn
    serves the socket."""

    def __init__(
        self, config: uvicorn.Config, worker: Worker | None, on_started: Callable[[], None]
    ) -> None:
        super().__init__(config)
        self._worker = worker
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self._on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._worker is not None:
            self._worker.stop()


def run_server(service: Service, *, host: str, port: int, embedded_worker: bool = True) -> None:
    """Serve until SIGTERM/SIGINT; the embedded worker stops with the same grace period.
    Raises CannotListen before anything started when a port cannot be had: the API's is
    bound first, then /metrics' (when apart); the worker starts once the API serves."""
    attach_preflight(service)
    sock = listen(host, port)
    try:
        metrics_server = _start_metrics(service, host)
    except CannotListen:
        sock.close()
        raise
    bound_host, bound_port = sock.getsockname()[:2]
    app = create_app(service)
    worker = Worker(service) if embedded_worker else None
    thread: threading.Thread | None = None

    def started() -> None:
        nonlocal thread
        log.info(
            "listening",
            extra={
                "action": "api.listen",
                "host": bound_host,
                "port": bound_port,
                "url": f"http://{_url_host(bound_host)}:{bound_port}/stable/",
                "worker": embedded_worker,
            },
        )
        if worker is not None:
            # In one process the API can wake the worker directly when it queues a request.
            service.requests.on_enqueue = worker.wake
            thread = threading.Thread(target=worker.run, name="worker", daemon=True)
            thread.start()

    config = server_config(app, service.settings, host=bound_host, port=bound_port)
    server = _Server(config, worker, started)

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
        server.run(sockets=[sock])  # returns on SIGINT/SIGTERM
    finally:
        sock.close()
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


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _start_metrics(service: Service, api_host: str) -> WSGIServer | None:
    """/metrics on its own address (VODPUSH_METRICS_PORT), when configured."""
    settings = service.settings
    if settings.metrics_port is None:
        return None
    return start_metrics(
        settings.metrics_host or api_host,
        settings.metrics_port,
        queue=service.queue,
        token=settings.metrics_token,
    )


def start_metrics(host: str, port: int, *, queue: Any, token: SecretStr | None) -> WSGIServer:
    """/metrics on ``host:port`` (metrics.start_metrics_server); CannotListen when the
    port cannot be had."""
    try:
        return start_metrics_server(
            host, port, queue=queue, token=token.get_secret_value() if token else None
        )
    except OSError as exc:
        raise CannotListen(_listen_failure("/metrics", host, port, exc)) from exc
