"""core.ports.AccountStorePort in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

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
from vodpush.memory.tables import AccountRow, Tables

log = logging.getLogger(__name__)


class MemoryAccountStore:
    """core.ports.AccountStorePort in memory; secrets encrypted with the SecretBox as in the
    database, so what a caller sees is the same."""

    def __init__(self, tables: Tables, box: SecretBox) -> None:
        self._t = tables
        self._box = box

    def _record(self, a: AccountRow) -> AccountRecord:
        s3_secret = self._box.decrypt(a.s3_secret_enc) if a.s3_secret_enc else None
        shared = any(o.username == a.username and o.id != a.id for o in self._t.accounts.values())
        return AccountRecord(
            id=a.id,
            cdn=a.cdn,
            username=a.username,
            api_key=a.api_key,
            enabled=a.enabled,
            api_secret_enc=a.api_secret_enc,
            s3=replace(a.s3, secret_access_key=s3_secret),
            created_at=a.created_at,
            allowed_buckets=a.allowed_buckets,
            webhook_secret_enc=a.webhook_secret_enc,
            username_shared=shared,
            max_in_flight=a.max_in_flight,
        )

    def api_secret(self, account: AccountRecord) -> str:
        return self._box.decrypt(account.api_secret_enc)

    def webhook_secret(self, account: AccountRecord) -> str:
        if account.webhook_secret_enc:
            return self._box.decrypt(account.webhook_secret_enc)
        return self.api_secret(account)

    def by_api_key(self, api_key: str) -> AccountRecord | None:
        with self._t.lock:
            for a in self._t.accounts.values():
                if a.api_key == api_key:
                    return self._record(a)
        return None

    def by_id(self, account_id: int) -> AccountRecord | None:
        with self._t.lock:
            a = self._t.accounts.get(account_id)
            return None if a is None else self._record(a)

    def _find(self, ref: str) -> AccountRow:
        found: AccountRow | None = None
        if "/" in ref:
            cdn, _, username = ref.partition("/")
            if cdn.isdigit():
                found = next(
                    (
                        a
                        for a in self._t.accounts.values()
                        if a.cdn == int(cdn) and a.username == username
                    ),
                    None,
                )
        elif ref.isdigit() and len(ref) < 12:
            found = self._t.accounts.get(int(ref))
        else:
            found = next((a for a in self._t.accounts.values() if a.api_key == ref), None)
        if found is None:
            raise AccountError(f"no such account: {ref!r}")
        return found

    def find(self, ref: str) -> AccountRecord:
        with self._t.lock:
            return self._record(self._find(ref))

    def list(self) -> list[AccountRecord]:
        with self._t.lock:
            return [self._record(a) for a in sorted(self._t.accounts.values(), key=lambda a: a.id)]

    def _check_username_free(self, username: str, but: int | None = None) -> None:
        for a in sorted(self._t.accounts.values(), key=lambda a: a.id):
            if a.username == username and a.id != but:
                raise AccountError(
                    f"an account with username {username!r} exists (id {a.id}, cdn {a.cdn}); "
                    "a username names a sestore directory, so it may belong to one account only"
                )

    def _encrypt_s3(self, s3: S3Settings) -> tuple[S3Settings, str | None]:
        secret = self._box.encrypt(s3.secret_access_key) if s3.secret_access_key else None
        return replace(s3, secret_access_key=None), secret

    def create(self, *, cdn: int, username: str, s3: S3Settings | None = None) -> dict[str, Any]:
        if cdn <= 0:
            raise AccountError("cdn must be a positive integer")
        check_username(username)
        s3 = s3 or S3Settings()
        check_s3(s3)
        api_key, api_secret = new_api_key(), new_api_secret()
        plain_s3, s3_secret_enc = self._encrypt_s3(s3)
        with self._t.lock:
            self._check_username_free(username)
            account_id = self._t.next_account
            self._t.next_account += 1
            self._t.accounts[account_id] = AccountRow(
                id=account_id,
                cdn=cdn,
                username=username,
                api_key=api_key,
                api_secret_enc=self._box.encrypt(api_secret),
                enabled=True,
                s3=plain_s3,
                s3_secret_enc=s3_secret_enc,
                created_at=utcnow(),
            )
        return {
            "id": account_id,
            "cdn": cdn,
            "username": username,
            "api_key": api_key,
            "api_secret": api_secret,
        }

    def _edit(self, ref: str, change: Callable[[AccountRow], None]) -> AccountRecord:
        with self._t.lock:
            account = self._find(ref)
            change(account)
            return self._record(account)

    def set_enabled(self, ref: str, enabled: bool) -> AccountRecord:
        return self._edit(ref, lambda a: setattr(a, "enabled", enabled))

    def rotate_secret(self, ref: str) -> dict[str, Any]:
        api_secret = new_api_secret()
        with self._t.lock:
            a = self._find(ref)
            a.api_secret_enc = self._box.encrypt(api_secret)
            return {
                "id": a.id,
                "cdn": a.cdn,
                "username": a.username,
                "api_key": a.api_key,
                "api_secret": api_secret,
            }

    def set_s3(self, ref: str, s3: S3Settings) -> AccountRecord:
        check_s3(s3)
        plain, secret = self._encrypt_s3(s3)

        def change(a: AccountRow) -> None:
            a.s3, a.s3_secret_enc = plain, secret

        return self._edit(ref, change)

    def set_max_in_flight(self, ref: str, limit: int | None) -> AccountRecord:
        check_max_in_flight(limit)
        return self._edit(ref, lambda a: setattr(a, "max_in_flight", limit))

    def allow_buckets(self, ref: str, patterns: list[str]) -> AccountRecord:
        for pattern in patterns:  # before the account is looked up, as a CLI error
            check_bucket_pattern(pattern)
        return self._edit_buckets(ref, lambda have: with_patterns_added(have, patterns))

    def disallow_buckets(self, ref: str, patterns: list[str]) -> AccountRecord:
        return self._edit_buckets(ref, lambda have: with_patterns_removed(have, patterns))

    def _edit_buckets(
        self, ref: str, change: Callable[[tuple[str, ...]], list[str]]
    ) -> AccountRecord:
        def edit(a: AccountRow) -> None:
            a.allowed_buckets = tuple(change(a.allowed_buckets))

        return self._edit(ref, edit)

    def rotate_webhook_secret(self, ref: str, *, clear: bool = False) -> dict[str, Any]:
        secret = None if clear else new_webhook_secret()
        with self._t.lock:
            a = self._find(ref)
            a.webhook_secret_enc = None if secret is None else self._box.encrypt(secret)
            shown: dict[str, Any] = {
                "id": a.id,
                "cdn": a.cdn,
                "username": a.username,
                "api_key": a.api_key,
            }
        return shown | {"webhook_secret": "api_secret" if secret is None else secret}

    def rename(self, ref: str, new_username: str) -> AccountRecord:
        check_username(new_username)
        with self._t.lock:
            a = self._find(ref)
            self._check_username_free(new_username, but=a.id)
            old, a.username = a.username, new_username
            record = self._record(a)
        log.info(
            "account renamed",
            extra={
                "action": "account.renamed",
                "account_id": a.id,
                "old_username": old,
                "username": new_username,
            },
        )
        return record

    def ensure_unique_usernames(self) -> list[str]:
        with self._t.lock:
            names = [a.username for a in self._t.accounts.values()]
        return sorted({n for n in names if names.count(n) > 1})
