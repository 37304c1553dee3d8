"""The S3 client of an account: from one cache of clients per set of credentials, endpoint,
region and checksum mode (transfer.clients), so accounts on the same credentials share one."""

from __future__ import annotations

from collections.abc import Callable

from botocore.client import BaseClient

from vodpush.config import Settings
from vodpush.core.accounts import AccountRecord
from vodpush.transfer.s3client import s3_client_cache

ClientFor = Callable[[AccountRecord], BaseClient]


class AccountClients:
    """``clients(account)``: the S3 client for ``account``'s settings as they are now."""

    def __init__(self, settings: Settings) -> None:
        self.cache = s3_client_cache(
            max_size=settings.s3_client_cache_size,
            ttl=settings.s3_client_ttl,
            refresh_margin=settings.s3_client_refresh_margin,
            max_pool_connections=max(16, settings.part_concurrency * 2),
        )

    def __call__(self, account: AccountRecord) -> BaseClient:
        return self.cache.client(account.s3)
