"""core.ports.OrphanStorePort in memory (recorded by the queue and the ledgers through
``Tables.record_checkpoint``)."""

from __future__ import annotations

from datetime import timedelta

from vodpush.core.orphans import Orphan
from vodpush.memory.tables import OrphanRow, Tables


class MemoryOrphanStore:
    def __init__(self, tables: Tables) -> None:
        self._t = tables

    def claim(self, lease_seconds: float, *, orphan_id: int | None = None) -> Orphan | None:
        now = self._t.now()
        with self._t.lock:
            if orphan_id is not None:
                row = self._t.orphans.get(orphan_id)
            else:
                due = [o for o in self._t.orphans.values() if o.next_at <= now]
                row = min(due, key=lambda o: (o.next_at, o.id), default=None)
            if row is None:
                return None
            row.next_at = now + timedelta(seconds=lease_seconds)
            row.attempts += 1
            return _orphan(row)

    def aborted(self, orphan_id: int) -> bool:
        with self._t.lock:
            return self._t.orphans.pop(orphan_id, None) is not None

    def retry_later(self, orphan_id: int, *, delay: float, error: str) -> bool:
        now = self._t.now()
        with self._t.lock:
            row = self._t.orphans.get(orphan_id)
            if row is None:
                return False
            row.next_at = now + timedelta(seconds=delay)
            row.last_error = error
            return True

    def list(self, *, request_id: int | None = None) -> list[Orphan]:
        with self._t.lock:
            rows = sorted(self._t.orphans.values(), key=lambda o: (o.created_at, o.id))
            return [
                _orphan(row) for row in rows if request_id is None or row.request_id == request_id
            ]

    def count(self) -> int:
        with self._t.lock:
            return len(self._t.orphans)


def _orphan(row: OrphanRow) -> Orphan:
    return Orphan(
        id=row.id,
        account_id=row.account_id,
        request_id=row.request_id,
        bucket=row.bucket,
        key=row.key,
        upload_id=row.upload_id,
        created_at=row.created_at,
        next_at=row.next_at,
        attempts=row.attempts,
        last_error=row.last_error,
    )
