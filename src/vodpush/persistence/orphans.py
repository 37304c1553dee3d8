"""core.ports.OrphanStorePort on SQLAlchemy, and the statement that records a request's
checkpoint as an orphan in the write that drops it (``persistence.queue`` runs it)."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Engine, String, bindparam, delete, func, select, update
from sqlalchemy.sql.elements import ColumnElement

from vodpush.core.orphans import Orphan
from vodpush.persistence import dialect
from vodpush.persistence.db import read, write_transaction
from vodpush.persistence.models import OrphanUpload, UploadRequest

_O = OrphanUpload.__table__
_T = UploadRequest.__table__
_RECORDED = ["account_id", "request_id", "bucket", "key", "upload_id", "created_at", "next_at"]


@functools.cache
def record_checkpoint(
    db: dialect.Dialect,
    leased: ColumnElement[bool],
    *,
    after_lease: bool = False,
    except_completed: bool = False,
) -> Any:
    """INSERT the upload of the checkpoint on the request ``leased`` selects (parameters
    rid, owner), if it has one, as an orphan due now; nothing if it is recorded already.
    Run in the transaction that drops the checkpoint, before the UPDATE that does: that
    UPDATE's lease check then decides for both (LeaseLost rolls the insert back).

    ``after_lease`` (a cancel, which takes the request from a worker that may still be
    sending parts): due when the request's lease runs out, if it has one, so that no
    reaper aborts the upload under the worker's parts in flight. That worker aborts it
    itself as soon as they are done (Reaper.reap_request); if it died, the reaper does.

    ``except_completed`` (a success): not the upload of parameter ``completed``, which S3
    completed into the object (it is gone at S3: there is nothing to abort)."""
    now = db.now()
    due = func.coalesce(_T.c.lease_expires_at, now) if after_lease else now
    rows = select(
        _T.c.account_id,
        _T.c.id,
        _T.c.bucket,
        _T.c.destination_path,
        db.json_text(_T.c.multipart_json, "upload_id"),
        now,
        due,
    ).where(leased, _T.c.multipart_json.is_not(None))
    if except_completed:
        upload_id = db.json_text(_T.c.multipart_json, "upload_id")
        rows = rows.where(upload_id != bindparam("completed", type_=String))
    return db.insert_new(_O, _RECORDED, rows, keys=[_O.c.account_id, _O.c.bucket, _O.c.upload_id])


class OrphanStore:
    """The orphan_uploads table. A claim pushes the row's next_at past a lease, on the
    database's clock, in one statement that skips rows another claim has locked."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._dialect = dialect.for_engine(engine)

    def claim(self, lease_seconds: float, *, orphan_id: int | None = None) -> Orphan | None:
        pick = select(_O.c.id)
        if orphan_id is None:
            pick = pick.where(_O.c.next_at <= self._dialect.now()).order_by(_O.c.next_at, _O.c.id)
        else:
            pick = pick.where(_O.c.id == orphan_id)
        pick = self._dialect.skip_locked(pick.limit(1))
        statement = (
            update(_O)
            .where(_O.c.id == pick.scalar_subquery())
            .values(next_at=self._dialect.now(lease_seconds), attempts=_O.c.attempts + 1)
            .returning(*_O.c)
        )
        with write_transaction(self._engine) as conn:
            row = conn.execute(statement).first()
        return None if row is None else _orphan(row)

    def aborted(self, orphan_id: int) -> bool:
        with write_transaction(self._engine) as conn:
            return bool(conn.execute(delete(_O).where(_O.c.id == orphan_id)).rowcount)

    def retry_later(self, orphan_id: int, *, delay: float, error: str) -> bool:
        statement = (
            update(_O)
            .where(_O.c.id == orphan_id)
            .values(next_at=self._dialect.now(delay), last_error=error)
        )
        with write_transaction(self._engine) as conn:
            return bool(conn.execute(statement).rowcount)

    def list(self, *, request_id: int | None = None) -> list[Orphan]:
        query = select(_O).order_by(_O.c.created_at, _O.c.id)
        if request_id is not None:
            query = query.where(_O.c.request_id == request_id)
        with read(self._engine) as conn:
            rows = conn.execute(query).all()
        return [_orphan(row) for row in rows]

    def count(self) -> int:
        with read(self._engine) as conn:
            return int(conn.execute(select(func.count()).select_from(_O)).scalar_one())


def _orphan(row: Any) -> Orphan:
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
