"""The S3 client of an account: from one cache of clients per set of credentials, endpoint,
region and checksum mode (transfer.clients), so accounts on the same credentials share one;
an account with a role has its role's client (transfer.roles), refreshing its credentials."""

from __future__ import annotations

from collections.abc import Callable

from botocore.client import BaseClient

from vodpush.config import Settings
from vodpush.core.accounts import AccountRecord, role_session_name
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
            role_session_seconds=settings.s3_role_session_seconds,
        )

    def __call__(self, account: AccountRecord) -> BaseClient:
        # An assumed role's sessions carry the account's id (the customer's CloudTrail
        # shows it); accounts without a role share clients by credentials as before.
        return self.cache.client(account.s3, session_name=role_session_name(account.id))
