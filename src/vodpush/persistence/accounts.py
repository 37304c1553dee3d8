"""Accounts: who may call the API, with which secret, and where their uploads go."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import lru_cache
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, exists, func, inspect, select, update
from sqlalchemy.exc import IntegrityError

from vodpush.core.accounts import (
    AccountError,
    AccountRecord,
    S3Settings,
    check_bucket_pattern,
    check_max_in_flight,
    check_s3,
    check_username,
    with_patterns_added,
    with_patterns_removed,
)
from vodpush.core.clock import utcnow
from vodpush.crypto import SecretBox, new_api_key, new_api_secret, new_webhook_secret
from vodpush.persistence import dialect
from vodpush.persistence.db import PreparedQuery, read, write_transaction
from vodpush.persistence.models import Account

log = logging.getLogger(__name__)

# Every column holding a secret encrypted with the SecretBox: what a key rotation must
# re-encrypt. A new encrypted column belongs here.
ENCRYPTED_COLUMNS = ("api_secret_enc", "s3_secret_access_key_enc", "webhook_secret_enc")

USERNAME_INDEX = "ix_accounts_username"
_A = Account.__table__


class AccountStore:
    def __init__(self, engine: Engine, box: SecretBox) -> None:
        self._engine = engine
        self._box = box
        self._dialect = dialect.for_engine(engine)
        # Each read tells whether another account shares the username (an index probe).
        other = _A.alias("other")
        shared = (
            exists()
            .where(other.c.username == _A.c.username, other.c.id != _A.c.id)
            .label("username_shared")
        )
        self._columns = select(*_A.c, shared)
        self._by_key = PreparedQuery(engine, self._columns.where(_A.c.api_key == bindparam("key")))
        self._by_id = PreparedQuery(engine, self._columns.where(_A.c.id == bindparam("id")))

    # -- reading -------------------------------------------------------------------------

    def _record(self, row: Any) -> AccountRecord:
        s3_secret = (
            _decrypt_cached(self._box, row.s3_secret_access_key_enc)
            if row.s3_secret_access_key_enc
            else None
        )
        return AccountRecord(
            id=row.id,
            cdn=row.cdn,
            username=row.username,
            api_key=row.api_key,
            enabled=bool(row.enabled),
            api_secret_enc=row.api_secret_enc,
            s3=S3Settings(
                endpoint_url=row.s3_endpoint_url,
                region=row.s3_region,
                access_key_id=row.s3_access_key_id,
                secret_access_key=s3_secret,
                sse=row.s3_sse,
                sse_kms_key_id=row.s3_sse_kms_key_id,
                checksums=bool(row.s3_checksums),
                role_arn=row.s3_role_arn,
                external_id=row.s3_external_id,
            ),
            created_at=row.created_at,
            allowed_buckets=_load_patterns(row.allowed_buckets),
            webhook_secret_enc=row.webhook_secret_enc,
            username_shared=bool(row.username_shared),
            max_in_flight=row.max_in_flight,
        )

    def api_secret(self, account: AccountRecord) -> str:
        return _decrypt_cached(self._box, account.api_secret_enc)

    def webhook_secret(self, account: AccountRecord) -> str:
        """The key callbacks of ``account`` are signed with: its own webhook secret when it
        has one, else (the compatible default) its API secret."""
        if account.webhook_secret_enc:
            return _decrypt_cached(self._box, account.webhook_secret_enc)
        return self.api_secret(account)

    def by_api_key(self, api_key: str) -> AccountRecord | None:
        """The lookup behind every API call (a prepared query)."""
        return self._from_row(self._by_key.first(key=api_key))

    def by_id(self, account_id: int) -> AccountRecord | None:
        """The lookup behind every upload (a prepared query)."""
        return self._from_row(self._by_id.first(id=account_id))

    def _from_row(self, row: Any) -> AccountRecord | None:
        return None if row is None else self._record(row)

    def find(self, ref: str) -> AccountRecord:
        """An account by api_key, id, or ``cdn/username``."""
        with read(self._engine) as conn:
            query = self._columns
            if "/" in ref:
                cdn, _, username = ref.partition("/")
                if not cdn.isdigit():
                    raise AccountError(f"no such account: {ref!r}")
                query = query.where(_A.c.cdn == int(cdn), _A.c.username == username)
            elif ref.isdigit() and len(ref) < 12:
                query = query.where(_A.c.id == int(ref))
            else:
                query = query.where(_A.c.api_key == ref)
            row = conn.execute(query).first()
        record = self._from_row(row)
        if record is None:
            raise AccountError(f"no such account: {ref!r}")
        return record

    def list(self) -> list[AccountRecord]:
        with read(self._engine) as conn:
            rows = conn.execute(self._columns.order_by(_A.c.id)).all()
        return [self._record(row) for row in rows]

    # -- writing -------------------------------------------------------------------------

    def create(self, *, cdn: int, username: str, s3: S3Settings | None = None) -> dict[str, Any]:
        """Create an account; returns its credentials, the only time the secret is shown."""
        if cdn <= 0:
            raise AccountError("cdn must be a positive integer")
        check_username(username)
        s3 = s3 or S3Settings()
        check_s3(s3)
        api_key, api_secret = new_api_key(), new_api_secret()
        now = utcnow()
        row = {
            "cdn": cdn,
            "username": username,
            "api_key": api_key,
            "api_secret_enc": self._box.encrypt(api_secret),
            "enabled": True,
            "created_at": now,
            "updated_at": now,
            **self._s3_columns(s3),
        }
        try:
            with write_transaction(self._engine) as conn:
                _check_username_free(conn, username)
                account_id = conn.execute(_A.insert().values(**row).returning(_A.c.id)).scalar_one()
        except IntegrityError as exc:
            # The unique index caught a concurrent create of the same username (or api_key).
            raise AccountError(f"an account with username {username!r} exists") from exc
        return {
            "id": account_id,
            "cdn": cdn,
            "username": username,
            "api_key": api_key,
            "api_secret": api_secret,
        }

    def _s3_columns(self, s3: S3Settings) -> dict[str, Any]:
        return {
            "s3_endpoint_url": s3.endpoint_url,
            "s3_region": s3.region,
            "s3_access_key_id": s3.access_key_id,
            "s3_secret_access_key_enc": (
                self._box.encrypt(s3.secret_access_key) if s3.secret_access_key else None
            ),
            "s3_sse": s3.sse,
            "s3_sse_kms_key_id": s3.sse_kms_key_id,
            "s3_checksums": s3.checksums,
            "s3_role_arn": s3.role_arn,
            "s3_external_id": s3.external_id,
        }

    def _update(self, account_id: int, **values: Any) -> None:
        with write_transaction(self._engine) as conn:
            result = conn.execute(
                update(Account)
                .where(Account.id == account_id)
                .values(**values, updated_at=utcnow())
            )
            if result.rowcount != 1:
                raise AccountError(f"account {account_id} vanished during the update")

    def set_enabled(self, ref: str, enabled: bool) -> AccountRecord:
        account = self.find(ref)
        self._update(account.id, enabled=enabled)
        return self.find(str(account.id))

    def rotate_secret(self, ref: str) -> dict[str, Any]:
        account = self.find(ref)
        api_secret = new_api_secret()
        self._update(account.id, api_secret_enc=self._box.encrypt(api_secret))
        return {
            "id": account.id,
            "cdn": account.cdn,
            "username": account.username,
            "api_key": account.api_key,
            "api_secret": api_secret,
        }

    def set_s3(self, ref: str, s3: S3Settings) -> AccountRecord:
        check_s3(s3)
        account = self.find(ref)
        self._update(account.id, **self._s3_columns(s3))
        return self.find(str(account.id))

    def set_max_in_flight(self, ref: str, limit: int | None) -> AccountRecord:
        check_max_in_flight(limit)
        account = self.find(ref)
        self._update(account.id, max_in_flight=limit)
        return self.find(str(account.id))

    # -- buckets ---------------------------------------------------------------------------

    def allow_buckets(self, ref: str, patterns: list[str]) -> AccountRecord:
        """Add bucket patterns to an account's list."""
        for pattern in patterns:  # before the account is looked up, as a CLI error
            check_bucket_pattern(pattern)
        return self._edit_buckets(ref, lambda have: with_patterns_added(have, patterns))

    def disallow_buckets(self, ref: str, patterns: list[str]) -> AccountRecord:
        """Remove patterns (exactly as listed) from an account's list."""
        return self._edit_buckets(ref, lambda have: with_patterns_removed(have, patterns))

    def _edit_buckets(
        self, ref: str, change: Callable[[tuple[str, ...]], list[str]]
    ) -> AccountRecord:
        account = self.find(ref)
        # Read and write under the write lock (SQLite) or the row lock (PostgreSQL), so two
        # operators' edits do not lose one another.
        with write_transaction(self._engine) as conn:
            query = select(_A.c.allowed_buckets).where(_A.c.id == account.id)
            current = conn.execute(self._dialect.for_update(query)).scalar_one_or_none()
            if current is None:
                raise AccountError(f"account {account.id} vanished during the update")
            patterns = change(_load_patterns(current))
            conn.execute(
                update(_A)
                .where(_A.c.id == account.id)
                .values(allowed_buckets=json.dumps(patterns), updated_at=utcnow())
            )
        return self.find(str(account.id))

    # -- webhook secret --------------------------------------------------------------------

    def rotate_webhook_secret(self, ref: str, *, clear: bool = False) -> dict[str, Any]:
        """Give an account its own callback signing key (returned once, ``whsec_...``), or
        with ``clear`` go back to signing with the API secret."""
        account = self.find(ref)
        secret = None if clear else new_webhook_secret()
        self._update(
            account.id, webhook_secret_enc=None if secret is None else self._box.encrypt(secret)
        )
        shown: dict[str, Any] = {
            "id": account.id,
            "cdn": account.cdn,
            "username": account.username,
            "api_key": account.api_key,
        }
        if secret is None:
            return shown | {"webhook_secret": "api_secret"}
        return shown | {"webhook_secret": secret}

    # -- usernames -------------------------------------------------------------------------

    def rename(self, ref: str, new_username: str) -> AccountRecord:
        """Give an account another username (the directory it reads: move its files)."""
        check_username(new_username)
        account = self.find(ref)
        try:
            with write_transaction(self._engine) as conn:
                _check_username_free(conn, new_username, but=account.id)
                conn.execute(
                    update(_A)
                    .where(_A.c.id == account.id)
                    .values(username=new_username, updated_at=utcnow())
                )
        except IntegrityError as exc:
            raise AccountError(f"an account with username {new_username!r} exists") from exc
        log.info(
            "account renamed",
            extra={
                "action": "account.renamed",
                "account_id": account.id,
                "old_username": account.username,
                "username": new_username,
            },
        )
        self.ensure_unique_usernames()
        return self.find(str(account.id))

    def ensure_unique_usernames(self) -> list[str]:
        """Create the unique index on usernames if migration 0003 had to leave it out and
        the duplicates are gone now; returns the usernames still shared (none: all well)."""
        with write_transaction(self._engine) as conn:
            shared = _shared_usernames(conn)
            if shared:
                return shared
            indexes = {ix["name"] for ix in inspect(conn).get_indexes("accounts")}
            if USERNAME_INDEX not in indexes:
                next(ix for ix in _A.indexes if ix.name == USERNAME_INDEX).create(conn)
                log.info(
                    "unique index on usernames created",
                    extra={"action": "account.username_index_created"},
                )
        return []


@lru_cache(maxsize=4096)
def _decrypt_cached(box: SecretBox, token: str) -> str:
    # Keyed by the ciphertext, so a rotated secret (a new token) is never served stale.
    return box.decrypt(token)


def _load_patterns(text: str | None) -> tuple[str, ...]:
    return tuple(json.loads(text)) if text else ()


def _check_username_free(conn: Connection, username: str, *, but: int | None = None) -> None:
    """Usernames name sestore directories: one account per username, whatever its cdn."""
    query = select(_A.c.id, _A.c.cdn).where(_A.c.username == username)
    if but is not None:
        query = query.where(_A.c.id != but)
    taken = conn.execute(query.limit(1)).first()
    if taken is not None:
        raise AccountError(
            f"an account with username {username!r} exists (id {taken.id}, cdn {taken.cdn}); "
            "a username names a sestore directory, so it may belong to one account only"
        )


def _shared_usernames(conn: Connection) -> list[str]:
    rows = conn.execute(
        select(_A.c.username).group_by(_A.c.username).having(func.count() > 1)
    ).scalars()
    return sorted(rows)
