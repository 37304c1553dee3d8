"""One botocore S3 client per account and S3 settings, made on first use and kept (clients
are thread-safe; making one costs tens of milliseconds)."""

from __future__ import annotations

import threading

from botocore.client import BaseClient

from vodpush.core.accounts import AccountRecord, S3Settings
from vodpush.transfer.s3client import make_s3_client


class S3Clients:
    """``clients(account)``: the S3 client of ``account`` as its settings are now."""

    def __init__(self, *, max_pool_connections: int = 16) -> None:
        self._pool = max_pool_connections
        self._lock = threading.Lock()
        self._clients: dict[tuple[int, S3Settings], BaseClient] = {}

    def __call__(self, account: AccountRecord) -> BaseClient:
        key = (account.id, account.s3)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = make_s3_client(account.s3, max_pool_connections=self._pool)
                self._clients[key] = client
            return client
