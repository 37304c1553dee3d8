"""Running the API under uvicorn."""

from __future__ import annotations

import logging

import uvicorn

from vodpush.api.app import create_app
from vodpush.service import Service

log = logging.getLogger(__name__)


def run_server(service: Service, *, host: str, port: int) -> None:
    app = create_app(service)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,  # keep our JSON logging
        access_log=False,
        proxy_headers=True,
        timeout_graceful_shutdown=int(service.settings.shutdown_grace),
    )
    server = uvicorn.Server(config)
    log.info("listening", extra={"action": "api.listen", "host": host, "port": port})
    try:
        server.run()
    finally:
        service.close()
