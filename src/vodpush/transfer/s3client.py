"""Building a botocore S3 client from an account's S3 settings, and the worker's cache of them.

Clients with the account's own keys come from one shared boto3 Session (it keeps the parsed
S3 service model: a client costs about 20 ms of CPU from it, 200 ms from a new session);
sessions are not thread-safe, so building from it is serialized; the clients are. Clients
with the default credentials (``AWS_*``, ``~/.aws``, an instance role) get a new Session, so a
rebuild reads the operator's credentials again. A client of an assumed role (the settings
name ``role_arn``) gets a session of its own holding the role's refreshable credentials
(transfer.roles), all of them sharing one loaded copy of the models. Nothing here runs at import
time.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import boto3
import botocore.session
from botocore.client import BaseClient
from botocore.config import Config
from botocore.credentials import CredentialProvider, CredentialResolver, Credentials

from vodpush.core.accounts import S3Settings, role_session_name
from vodpush.transfer.clients import Built, ClientCache
from vodpush.transfer.roles import DEFAULT_SESSION_SECONDS, role_credentials

CONNECT_TIMEOUT = 10
READ_TIMEOUT = 60

_session_lock = threading.Lock()
_shared_session: boto3.session.Session | None = None
# Loads (and keeps) the service models the clients of assumed roles share.
_models_session: botocore.session.Session | None = None


def s3_client_cache(
    *,
    max_size: int,
    ttl: float,
    refresh_margin: float,
    max_pool_connections: int = 16,
    max_attempts: int = 3,
    role_session_seconds: int = DEFAULT_SESSION_SECONDS,
) -> ClientCache[BaseClient]:
    """The worker's clients: one per set of credentials, endpoint, region and checksum mode
    (see ``transfer.clients``), built by ``make_s3_client`` with these pool and retry limits.
    An assumed role's client refreshes its credentials itself: its entry is not given an
    expiry."""

    def build(s3: S3Settings, session_name: str | None) -> Built[BaseClient]:
        client = make_s3_client(
            s3,
            max_pool_connections=max_pool_connections,
            max_attempts=max_attempts,
            session_name=session_name,
            role_session_seconds=role_session_seconds,
        )
        return Built(client)

    return ClientCache(build, max_size=max_size, ttl=ttl, refresh_margin=refresh_margin)


def make_s3_client(
    s3: S3Settings,
    *,
    max_pool_connections: int = 16,
    max_attempts: int = 3,
    connect_timeout: float = CONNECT_TIMEOUT,
    read_timeout: float = READ_TIMEOUT,
    session_name: str | None = None,
    role_session_seconds: int = DEFAULT_SESSION_SECONDS,
    credentials: Credentials | None = None,
) -> BaseClient:
    """A botocore S3 client for ``s3``; fields left as None follow boto3's own conventions
    (``AWS_*`` environment variables, ``AWS_ENDPOINT_URL_S3``, ``~/.aws``).

    ``max_pool_connections`` should be at least the upload concurrency, or parts queue for a
    connection. ``max_attempts`` counts botocore's own quick retries of one request (standard
    mode: throttling, 5xx, connection errors); the worker's backoff retries come on top.
    With ``s3.role_arn`` the client signs with the role's credentials, assumed as
    ``session_name`` for ``role_session_seconds`` and refreshed ahead of expiry;
    ``credentials`` gives them ready-made (the preflight makes them first, to see the role
    assumed).
    """
    if max_pool_connections < 1:
        raise ValueError("max_pool_connections must be at least 1")
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    # botocore hashes every body once more to sign it on plain-HTTP endpoints. The uploader
    # sends a SHA-256 checksum (or, with checksums off, a Content-MD5) with every body, in a
    # signed header that S3 checks against the bytes: botocore's own reason to skip that
    # over HTTPS. What S3 stored is verified after every upload anyway.
    s3_options: dict[str, Any] = {"payload_signing_enabled": False}
    if _has_custom_endpoint(s3):
        # S3-compatible stores (MinIO, Ceph, moto, IP addresses) rarely have wildcard DNS
        # for virtual-hosted buckets; path style works everywhere.
        s3_options["addressing_style"] = "path"
    options: dict[str, Any] = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "max_pool_connections": max_pool_connections,
        "retries": {"mode": "standard", "max_attempts": max_attempts},
        "s3": s3_options,
    }
    if not s3.checksums:
        # Some S3-compatible stores reject the CRC headers botocore adds by default since
        # 1.36; only send checksums an operation strictly requires.
        options["request_checksum_calculation"] = "when_required"
        options["response_checksum_validation"] = "when_required"
    config = Config(**options)
    if s3.role_arn:
        if credentials is None:
            credentials = role_credentials(
                s3,
                session_name=session_name or role_session_name(None),
                duration=role_session_seconds,
                connect_timeout=connect_timeout,
                read_timeout=min(read_timeout, READ_TIMEOUT),
                max_attempts=max_attempts,
            )
        return _client_with(credentials, s3, config)
    if not s3.access_key_id:
        session = boto3.session.Session(region_name=s3.region)
        return session.client("s3", endpoint_url=s3.endpoint_url, config=config)
    with _session_lock:
        return _session().client(
            "s3",
            endpoint_url=s3.endpoint_url,
            region_name=s3.region,
            aws_access_key_id=s3.access_key_id,
            aws_secret_access_key=s3.secret_access_key,
            config=config,
        )


class _Given(CredentialProvider):
    """A credential provider that hands out the credentials it was made with."""

    METHOD = "vodpush-assume-role"
    CANONICAL_NAME = "vodpush-assume-role"

    def __init__(self, credentials: Credentials) -> None:
        super().__init__()
        self._credentials = credentials

    def load(self) -> Credentials:
        return self._credentials


def _client_with(credentials: Credentials, s3: S3Settings, config: Config) -> BaseClient:
    """An S3 client signing with ``credentials`` (refreshable ones refresh themselves):
    a botocore session of its own, whose only credential source they are, sharing the
    models loaded once for all of them (a new session would parse them again)."""
    global _models_session
    with _session_lock:
        if _models_session is None:
            _models_session = botocore.session.Session()
        loader = _models_session.get_component("data_loader")
        session = botocore.session.Session()
        session.register_component("data_loader", loader)
        session.register_component("credential_provider", CredentialResolver([_Given(credentials)]))
        return session.create_client(
            "s3", region_name=s3.region, endpoint_url=s3.endpoint_url, config=config
        )


def _session() -> boto3.session.Session:
    """The shared session (lock held); made on first use, not at import."""
    global _shared_session
    if _shared_session is None:
        _shared_session = boto3.session.Session()
    return _shared_session


def _has_custom_endpoint(s3: S3Settings) -> bool:
    # Endpoints from ~/.aws/config are not seen here; they keep botocore's automatic style.
    return bool(
        s3.endpoint_url
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
    )
