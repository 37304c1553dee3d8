"""Key rotation: re-encrypt every secret at rest with the first configured key.

The order of the steps is what makes a rotation safe to interrupt at any instruction:

1. the new key is added in front of the old ones (in the key file, atomically, or by the
   operator in ``VODPUSH_SECRET_KEY`` on every process) before any secret is re-encrypted,
   so every process can read what the rotation writes;
2. secrets are re-encrypted in small transactions, each one a compare-and-set on the old
   ciphertext, so a secret changed meanwhile is never overwritten with a stale one; passes
   repeat until one finds nothing left under an old key;
3. the old keys are dropped only then, and one more pass re-encrypts any secret that a
   process still holding only the old key wrote in the meantime.

Killed anywhere, every secret still decrypts with the keys in place (new and old), and the
same command run again resumes and finishes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, func, select, update

from vodpush.crypto import (
    SecretBox,
    fingerprint,
    generate_key,
    parse_keys,
    read_key_file,
    stale_temp_files,
    write_key_file,
)
from vodpush.persistence.accounts import ENCRYPTED_COLUMNS
from vodpush.persistence.db import write_transaction
from vodpush.persistence.models import Account

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (accounts done in this pass, accounts in all)
_MAX_PASSES = 10


class RotationError(RuntimeError):
    """The rotation cannot go on; nothing was dropped, and the message says what to do."""


@dataclass
class ReencryptReport:
    accounts: int = 0
    secrets: int = 0
    reencrypted: int = 0
    passes: int = 0


@dataclass
class RotationReport:
    source: str  # "file" or "env"
    keys_before: list[str]  # fingerprints, the encrypting key first
    keys_after: list[str]
    reencrypt: ReencryptReport = field(default_factory=ReencryptReport)
    resumed: bool = False
    dropped: list[str] = field(default_factory=list)


def _batches(engine: Engine, batch_size: int) -> Iterator[list]:  # type: ignore[type-arg]
    table = Account.__table__
    columns = [table.c[name] for name in ENCRYPTED_COLUMNS]
    last_id = 0
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                select(table.c.id, *columns)
                .where(table.c.id > last_id)
                .order_by(table.c.id)
                .limit(batch_size)
            ).all()
        if not rows:
            return
        yield rows
        last_id = rows[-1].id


def reencrypt_all(
    engine: Engine,
    box: SecretBox,
    *,
    batch_size: int = 100,
    pause: float = 0.0,
    on_progress: Progress | None = None,
) -> ReencryptReport:
    """Re-encrypt with ``box``'s first key every secret in ENCRYPTED_COLUMNS that is under
    another key; passes repeat until one changes nothing. Raises RotationError if a secret
    decrypts with none of the keys (then no key may be dropped)."""
    table = Account.__table__
    report = ReencryptReport()
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(table)).scalar_one()
    while True:
        report.passes += 1
        changed = raced = done = seen = 0
        for rows in _batches(engine, batch_size):
            updates: list[tuple[int, str, str, str]] = []
            for row in rows:
                for name in ENCRYPTED_COLUMNS:
                    token = getattr(row, name)
                    if token is None:
                        continue
                    seen += 1
                    index = box.key_index(token)
                    if index == 0:
                        continue
                    if index is None:
                        raise RotationError(
                            f"account {row.id}: {name} decrypts with none of the configured "
                            "keys; add the key that encrypted it (after the new one) and run "
                            "the rotation again"
                        )
                    updates.append((row.id, name, token, box.rotate(token)))
            if updates:
                with write_transaction(engine) as conn:
                    for account_id, name, old, new in updates:
                        column = table.c[name]
                        result = conn.execute(
                            update(table)
                            .where(table.c.id == account_id, column == old)
                            .values({name: new})
                        )
                        # 0 rows: the secret changed meanwhile; the next pass looks again.
                        if result.rowcount == 1:
                            changed += 1
                        else:
                            raced += 1
            done += len(rows)
            if on_progress is not None:
                on_progress(done, max(total, done))
            if pause:
                time.sleep(pause)
        report.accounts = done
        report.secrets = seen
        report.reencrypted += changed
        log.info(
            "re-encryption pass done",
            extra={
                "action": "secrets.reencrypt_pass",
                "pass": report.passes,
                "accounts": done,
                "reencrypted": changed,
                "raced": raced,
                "key": box.fingerprints[0],
            },
        )
        if changed == 0 and raced == 0:
            return report
        if report.passes >= _MAX_PASSES:
            raise RotationError(
                f"secrets kept changing under an old key after {_MAX_PASSES} passes: is a "
                "process still running with only the old key? Give it the new key and run "
                "the rotation again"
            )


def count_by_key(engine: Engine, box: SecretBox) -> dict[int | None, int]:
    """How many secrets each key decrypts (key position, 0 the encrypting key; None: none)."""
    counts: Counter[int | None] = Counter()
    for rows in _batches(engine, 500):
        for row in rows:
            for name in ENCRYPTED_COLUMNS:
                token = getattr(row, name)
                if token is not None:
                    counts[box.key_index(token)] += 1
    return dict(counts)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[None]:
    """One rotation at a time per key file: an flock on its directory (nothing to clean up
    when a rotation is killed)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RotationError(
                f"another key rotation is running on {directory} (it holds a lock)"
            ) from None
        yield
    finally:
        os.close(fd)


def rotate_file_keys(
    engine: Engine,
    key_file: Path,
    *,
    new_key: str | None = None,
    keep_old: bool = False,
    batch_size: int = 100,
    pause: float = 0.0,
    on_progress: Progress | None = None,
) -> RotationReport:
    """The whole rotation when the keys live in ``key_file``: write the new key first, re-
    encrypt, then drop the old keys (unless ``keep_old``). A file that already holds several
    keys is an interrupted (or prepared) rotation: it resumes with its first key."""
    if new_key is not None:
        parse_keys(new_key, "--new-key")
    with _directory_lock(key_file.parent):
        for stale in stale_temp_files(key_file):
            stale.unlink(missing_ok=True)  # a killed rotation's half-written key file
        keys = read_key_file(key_file)
        report = RotationReport(
            source="file", keys_before=[fingerprint(k) for k in keys], keys_after=[]
        )
        if new_key is None and len(keys) > 1:
            report.resumed = True
        else:
            new_key = new_key or generate_key()
            if keys[0] != new_key:
                keys = [new_key, *[k for k in keys if k != new_key]]
                write_key_file(key_file, keys)
                log.info(
                    "new key written first in the key file",
                    extra={
                        "action": "secrets.key_added",
                        "path": str(key_file),
                        "keys": [fingerprint(k) for k in keys],
                    },
                )
        box = SecretBox(keys)
        report.reencrypt = reencrypt_all(
            engine, box, batch_size=batch_size, pause=pause, on_progress=on_progress
        )
        if not keep_old and len(keys) > 1:
            on_disk = read_key_file(key_file)
            if on_disk[0] != keys[0]:
                raise RotationError(
                    f"{key_file} changed during the rotation (its first key is no longer "
                    "the new key): old keys left in place"
                )
            write_key_file(key_file, [keys[0]])
            report.dropped = [fingerprint(k) for k in keys[1:]]
            log.info(
                "old keys dropped from the key file",
                extra={
                    "action": "secrets.keys_dropped",
                    "path": str(key_file),
                    "dropped": report.dropped,
                },
            )
            # A process that had not yet re-read the file may have written under an old
            # key since the last pass: this box still holds the old keys, so fix it now.
            report.reencrypt.reencrypted += reencrypt_all(
                engine, box, batch_size=batch_size
            ).reencrypted
        report.keys_after = [fingerprint(k) for k in read_key_file(key_file)]
        return report


def rotate_env_keys(
    engine: Engine,
    keys: Sequence[str],
    *,
    new_key: str | None = None,
    batch_size: int = 100,
    pause: float = 0.0,
    on_progress: Progress | None = None,
) -> RotationReport:
    """Re-encrypt with the first of ``keys`` (``VODPUSH_SECRET_KEY``), or with ``new_key``
    put in front of them. The environment cannot be rewritten from here: the report says
    which keys the operator keeps."""
    keys = list(keys)
    if new_key is not None:
        parse_keys(new_key, "--new-key")
        keys = [new_key, *[k for k in keys if k != new_key]]
    if len(keys) < 2:
        raise RotationError("VODPUSH_SECRET_KEY holds one key: there is no new key to rotate to")
    box = SecretBox(keys)
    report = RotationReport(
        source="env",
        keys_before=[fingerprint(k) for k in keys],
        keys_after=[fingerprint(keys[0])],
    )
    report.reencrypt = reencrypt_all(
        engine, box, batch_size=batch_size, pause=pause, on_progress=on_progress
    )
    return report  # nothing dropped: the operator removes the old keys from the environment
