"""S3 clients reused across uploads: a bounded LRU cache keyed by what shapes a client.

A botocore client costs about 20 ms of CPU to build from a shared session and 200 ms from a
new one, and is thread-safe once built: a worker keeps one per set of credentials, endpoint,
region and checksum mode, not one per account, so every account that uploads with the
operator's default credentials shares a single client. Each entry is rebuilt after ``ttl``
seconds (default credentials and shared config files are read again), or ``refresh_margin``
seconds before the credentials it was built with expire when the builder says they do
(credentials from an assumed role); a refresh that fails keeps serving the old client while
its credentials are still valid. Concurrent lookups of one missing key build it once; a
build never holds the lock that other keys' lookups take.

A client of an assumed role refreshes its credentials itself (transfer.roles): its entry
lives for ``ttl`` like the others. Its key holds the role, the external id and the session
name (one per account: the customer's CloudTrail tells the accounts apart), so accounts
share a role's client only when they are the same identity.

Secrets are never part of a key, a log line or a repr: a key holds a keyed digest of the
secret (a per-cache random key), so a rotated secret still gets a new client.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from vodpush.core.accounts import S3Settings

__all__ = ["NON_CLIENT_FIELDS", "Builder", "Built", "ClientCache", "ClientKey", "client_key"]

log = logging.getLogger(__name__)

C = TypeVar("C")

# S3Settings fields that do not shape the client (they go with each object, see
# transfer.options): accounts differing only in these share a client. A new S3Settings
# field is either here or in ClientKey (tests/test_clients.py checks).
NON_CLIENT_FIELDS = frozenset({"sse", "sse_kms_key_id"})
# After a refresh fails while the old client is still valid, how long to keep it before the
# next try (not on every lookup: a failing credential source is not hammered).
REFRESH_RETRY_SECONDS = 10.0


@dataclass(frozen=True, repr=False)
class ClientKey:
    """What makes two S3 clients interchangeable. ``secret_digest`` is an HMAC of the secret
    under the cache's own random key: equal secrets compare equal, and nothing printed or
    kept reveals one."""

    endpoint_url: str | None
    region: str | None
    access_key_id: str | None
    secret_digest: bytes | None
    checksums: bool
    # A role to assume: another role (or external id) is another identity.
    role_arn: str | None = None
    external_id: str | None = None
    session_name: str | None = None  # the role's RoleSessionName (None without a role)

    def __repr__(self) -> str:
        # The access key id is an identifier, not a secret (S3 puts it in every request).
        return (
            f"ClientKey(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={self.access_key_id!r}, checksums={self.checksums!r}, "
            f"role_arn={self.role_arn!r}, session_name={self.session_name!r})"
        )


def client_key(s3: S3Settings, digest_key: bytes, session_name: str | None = None) -> ClientKey:
    secret = s3.secret_access_key
    return ClientKey(
        endpoint_url=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_digest=(
            None
            if secret is None
            else hmac.new(digest_key, secret.encode("utf-8"), hashlib.sha256).digest()
        ),
        checksums=s3.checksums,
        role_arn=s3.role_arn,
        external_id=s3.external_id,
        session_name=session_name if s3.role_arn else None,
    )


@dataclass(frozen=True)
class Built(Generic[C]):
    """A client as the builder made it. ``expires_in``: seconds its credentials stay valid
    (None: they do not expire, or the client refreshes them itself)."""

    client: C
    expires_in: float | None = None


@dataclass
class _Entry(Generic[C]):
    client: C
    refresh_at: float  # after this the next lookup rebuilds it
    expires_at: float  # after this it is never handed out (inf: credentials do not expire)


# Builds the client of an account's S3 settings; the second argument is the session name
# for an assumed role (None: no role, or the builder's default name).
Builder = Callable[[S3Settings, str | None], Built[C]]


class ClientCache(Generic[C]):
    """``client(s3)``: the cached client for ``s3``'s credentials, built by ``build`` when
    there is none, it is older than ``ttl``, or its credentials expire within
    ``refresh_margin`` seconds. At most ``max_size`` clients are kept (least recently used
    goes first; an upload still using an evicted client finishes with it)."""

    def __init__(
        self,
        build: Builder[C],
        *,
        max_size: int,
        ttl: float,
        refresh_margin: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if ttl <= 0 or refresh_margin < 0:
            raise ValueError("ttl must be positive and refresh_margin not negative")
        self._build = build
        self.max_size = max_size
        self.ttl = ttl
        self.refresh_margin = refresh_margin
        self._clock = clock
        self._digest_key = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._entries: OrderedDict[ClientKey, _Entry[C]] = OrderedDict()
        # One lock per key being built: lookups of that key wait for the one build; a key
        # present here with a valid old entry is being refreshed, and the old one is served.
        self._building: dict[ClientKey, threading.Lock] = {}
        self.builds = 0
        self.hits = 0
        self.evictions = 0

    def __repr__(self) -> str:
        return f"ClientCache(size={len(self)}, max_size={self.max_size}, ttl={self.ttl})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def key(self, s3: S3Settings, session_name: str | None = None) -> ClientKey:
        return client_key(s3, self._digest_key, session_name)

    def client(self, s3: S3Settings, *, session_name: str | None = None) -> C:
        """``session_name``: what sessions of ``s3``'s role are called (ignored without
        one)."""
        key = self.key(s3, session_name)
        with self._lock:
            entry = self._usable(key, self._clock())
            if entry is not None:
                return entry.client
            gate = self._building.setdefault(key, threading.Lock())
        with gate:
            with self._lock:
                now = self._clock()
                entry = self._entries.get(key)
                if entry is not None and now < entry.refresh_at:
                    self.hits += 1  # built by the lookup this one waited for
                    self._entries.move_to_end(key)
                    return entry.client
            try:
                return self._rebuild(key, s3, entry)
            finally:
                with self._lock:
                    if self._building.get(key) is gate:
                        del self._building[key]

    def _usable(self, key: ClientKey, now: float) -> _Entry[C] | None:
        """The entry to serve without building (lock held), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        fresh = now < entry.refresh_at
        # Due for a refresh that another thread is already making: the old client is
        # still valid, so serve it rather than wait.
        if fresh or (key in self._building and now < entry.expires_at):
            self.hits += 1
            self._entries.move_to_end(key)
            return entry
        return None

    def _rebuild(self, key: ClientKey, s3: S3Settings, old: _Entry[C] | None) -> C:
        started = self._clock()
        try:
            built = self._build(s3, key.session_name)
        except Exception:
            with self._lock:
                now = self._clock()
                if old is None or now >= old.expires_at or self._entries.get(key) is not old:
                    raise
                old.refresh_at = min(now + REFRESH_RETRY_SECONDS, old.expires_at)
            log.warning(
                "S3 client refresh failed; the current client is kept while its credentials "
                "are valid",
                exc_info=True,
                extra={"action": "s3.client_refresh_failed", "client": repr(key)},
            )
            return old.client
        with self._lock:
            self.builds += 1
            entry = self._entry(built, started)
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
                self.evictions += 1
        log.debug(
            "S3 client built",
            extra={
                "action": "s3.client_built",
                "client": repr(key),
                "seconds": round(self._clock() - started, 4),
            },
        )
        return built.client

    def _entry(self, built: Built[C], started: float) -> _Entry[C]:
        # Times count from the start of the build: credentials fetched during it expire
        # no later than that plus what they were given for.
        refresh_at = started + self.ttl
        expires_at = float("inf")
        if built.expires_in is not None:
            expires_at = started + built.expires_in
            refresh_at = min(refresh_at, expires_at - self.refresh_margin)
        return _Entry(built.client, refresh_at, expires_at)
