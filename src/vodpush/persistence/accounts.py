"""Accounts: who may call the API, with which secret, and where their uploads go."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import Engine, bindparam, select, update
from sqlalchemy.exc import IntegrityError

from vodpush.crypto import SecretBox, new_api_key, new_api_secret
from vodpush.persistence.db import PreparedQuery, write_transaction
from vodpush.persistence.models import Account
from vodpush.records import format_time

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
SSE_CHOICES = ("AES256", "aws:kms")
# Every column that holds a secret encrypted with the SecretBox: `vodpush secrets
# rotate-key` re-encrypts exactly these, so a new encrypted column is one entry here.
ENCRYPTED_COLUMNS = ("api_secret_enc", "s3_secret_access_key_enc")


class AccountError(ValueError):
    """An operator asked for something about accounts that cannot be done."""


def utcnow() -> datetime:
    """Naive UTC, as stored in the database."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    sse: str | None = None
    sse_kms_key_id: str | None = None
    checksums: bool = True

    def __repr__(self) -> str:  # never show the secret
        masked = "**********" if self.secret_access_key else None
        return (
            f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r}, "
            f"access_key_id={self.access_key_id!r}, secret_access_key={masked!r}, "
            f"sse={self.sse!r}, sse_kms_key_id={self.sse_kms_key_id!r}, "
            f"checksums={self.checksums!r})"
        )


@dataclass(frozen=True)
class AccountRecord:
    id: int
    cdn: int
    username: str
    api_key: str
    enabled: bool
    api_secret_enc: str
    s3: S3Settings
    created_at: datetime | str

    def public(self) -> dict[str, Any]:
        """What an operator may see: no secrets."""
        return {
            "id": self.id,
            "cdn": self.cdn,
            "username": self.username,
            "api_key": self.api_key,
            "enabled": self.enabled,
            "s3_endpoint_url": self.s3.endpoint_url,
            "s3_region": self.s3.region,
            "s3_access_key_id": self.s3.access_key_id,
            "s3_secret_access_key": "**********" if self.s3.secret_access_key else None,
            "s3_sse": self.s3.sse,
            "s3_sse_kms_key_id": self.s3.sse_kms_key_id,
            "s3_checksums": self.s3.checksums,
            "created": format_time(self.created_at),
        }


class AccountStore:
    def __init__(self, engine: Engine, box: SecretBox) -> None:
        self._engine = engine
        self._box = box
        columns = select(*Account.__table__.c)
        self._by_key = PreparedQuery(engine, columns.where(Account.api_key == bindparam("key")))
        self._by_id = PreparedQuery(engine, columns.where(Account.id == bindparam("id")))

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
            ),
            created_at=row.created_at,
        )

    def api_secret(self, account: AccountRecord) -> str:
        return _decrypt_cached(self._box, account.api_secret_enc)

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
        with self._engine.connect() as conn:
            query = select(Account)
            if "/" in ref:
                cdn, _, username = ref.partition("/")
                if not cdn.isdigit():
                    raise AccountError(f"no such account: {ref!r}")
                query = query.where(Account.cdn == int(cdn), Account.username == username)
            elif ref.isdigit() and len(ref) < 12:
                query = query.where(Account.id == int(ref))
            else:
                query = query.where(Account.api_key == ref)
            row = conn.execute(query).first()
        record = self._from_row(row)
        if record is None:
            raise AccountError(f"no such account: {ref!r}")
        return record

    def list(self) -> list[AccountRecord]:
        with self._engine.connect() as conn:
            rows = conn.execute(select(Account).order_by(Account.id)).all()
        return [self._record(row) for row in rows]

    # -- writing -------------------------------------------------------------------------

    def create(self, *, cdn: int, username: str, s3: S3Settings | None = None) -> dict[str, Any]:
        """Create an account; returns its credentials, the only time the secret is shown."""
        if cdn <= 0:
            raise AccountError("cdn must be a positive integer")
        if not USERNAME_RE.match(username):
            raise AccountError(
                "username must be 1-64 characters of letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        s3 = s3 or S3Settings()
        _check_s3(s3)
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
                account_id = conn.execute(
                    Account.__table__.insert().values(**row).returning(Account.id)
                ).scalar_one()
        except IntegrityError as exc:
            raise AccountError(
                f"an account for cdn {cdn} and username {username!r} exists"
            ) from exc
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
        _check_s3(s3)
        account = self.find(ref)
        self._update(account.id, **self._s3_columns(s3))
        return self.find(str(account.id))


@lru_cache(maxsize=4096)
def _decrypt_cached(box: SecretBox, token: str) -> str:
    # Keyed by the ciphertext, so a rotated secret (a new token) is never served stale.
    return box.decrypt(token)


def _check_s3(s3: S3Settings) -> None:
    if s3.sse is not None and s3.sse not in SSE_CHOICES:
        raise AccountError(f"s3 sse must be one of {', '.join(SSE_CHOICES)}, not {s3.sse!r}")
    if s3.sse_kms_key_id and s3.sse != "aws:kms":
        raise AccountError("a KMS key id needs sse aws:kms")
    if bool(s3.access_key_id) != bool(s3.secret_access_key):
        raise AccountError("give both the S3 access key id and its secret, or neither")
    if s3.endpoint_url and not s3.endpoint_url.startswith(("http://", "https://")):
        raise AccountError("s3 endpoint must be an http:// or https:// URL")
