"""Wiring: the settings, the stores a process needs (behind the core.ports interfaces), the
part ledgers and the wake-up channel of its workers, built once."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine

from vodpush.config import Settings
from vodpush.core.ports import (
    AccountStorePort,
    LedgerFactory,
    Notifications,
    OrphanStorePort,
    QueueStorePort,
    RequestStorePort,
)
from vodpush.core.preflight import PreflightPort
from vodpush.crypto import SecretBox, load_secret_box
from vodpush.memory import MemoryStores
from vodpush.persistence import db, dialect
from vodpush.persistence.accounts import AccountStore
from vodpush.persistence.orphans import OrphanStore
from vodpush.persistence.queue import DbLedger, QueueStore
from vodpush.persistence.requests import RequestStore


@dataclass
class Service:
    settings: Settings
    engine: Engine | None  # None: the stores are in memory
    box: SecretBox
    accounts: AccountStorePort
    requests: RequestStorePort
    queue: QueueStorePort
    # The part ledger of one leased request: ledger(request_id, owner, empty=...).
    ledger: LedgerFactory
    # Multipart uploads given up without a confirmed abort, for the reaper.
    orphans: OrphanStorePort
    # What wakes workers when another process queues a request (None: polling only).
    notifications: Notifications | None = None
    # Reads never wait (SQLite, memory): the API may serve them on its event loop.
    inline_reads: bool = True
    # aws.upload's preflight against S3 (transfer.preflight.S3Preflight, set by `vodpush
    # serve`: the API itself loads no S3 library); None refuses a preflight.
    preflight: PreflightPort | None = None

    @classmethod
    def open(
        cls, settings: Settings, *, migrate: bool = True, engine: Engine | None = None
    ) -> Service:
        """The stores on ``engine`` (default: a new one for ``settings.database_url``),
        migrated first unless ``migrate`` is false."""
        if engine is None:
            engine = db.make_engine(settings.database_url)
        if migrate:
            db.upgrade(engine)
        box = load_secret_box(settings)
        kind = dialect.for_engine(engine)
        return cls(
            settings=settings,
            engine=engine,
            box=box,
            accounts=AccountStore(engine, box),
            requests=RequestStore(engine),
            queue=QueueStore(engine),
            ledger=functools.partial(DbLedger, engine),
            orphans=OrphanStore(engine),
            notifications=kind.notifications(engine),
            inline_reads=kind.inline_reads,
        )

    @classmethod
    def in_memory(
        cls,
        settings: Settings,
        box: SecretBox | None = None,
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> Service:
        """Every store in memory (vodpush.memory): nothing survives the process. ``clock``:
        the stores' own clock (naive UTC), as a database has its own; tests move it."""
        box = box or load_secret_box(settings)
        stores = MemoryStores(box, clock=clock)
        return cls(
            settings=settings,
            engine=None,
            box=box,
            accounts=stores.accounts,
            requests=stores.requests,
            queue=stores.queue,
            ledger=stores.ledger,
            orphans=stores.orphans,
        )

    def database(self) -> Engine:
        """The SQLAlchemy engine, for the operator tools that work on the database itself
        (key rotation)."""
        if self.engine is None:
            raise ValueError("this service keeps its stores in memory, not in a database")
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.dispose()
