"""Every store in memory (core.ports), with the database stores' semantics: for tests of
the layers above (the worker runner's tests run on these in seconds) and for a one-process
trial without a database. Thread-safe: one lock over all the stores of a ``MemoryStores``.
tests/test_store_contract.py holds these and the SQLAlchemy stores to the same behaviour."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

from vodpush.crypto import SecretBox
from vodpush.memory.accounts import MemoryAccountStore
from vodpush.memory.orphans import MemoryOrphanStore
from vodpush.memory.queue import MemoryQueueStore, MemoryRequestLedger, MemoryRequestStore
from vodpush.memory.tables import Tables

__all__ = [
    "MemoryAccountStore",
    "MemoryOrphanStore",
    "MemoryQueueStore",
    "MemoryRequestLedger",
    "MemoryRequestStore",
    "MemoryStores",
]


class MemoryStores:
    """One in-memory database: its account, request, queue and orphan stores, and its
    ledgers."""

    def __init__(self, box: SecretBox, *, clock: Callable[[], datetime] | None = None) -> None:
        self.tables = Tables(clock)
        self.accounts = MemoryAccountStore(self.tables, box)
        self.requests = MemoryRequestStore(self.tables)
        self.queue = MemoryQueueStore(self.tables)
        self.orphans = MemoryOrphanStore(self.tables)

    def ledger(self, request_id: int, owner: str, *, empty: bool = False) -> MemoryRequestLedger:
        return MemoryRequestLedger(self.tables, request_id, owner, empty=empty)
