"""A request's history (request_events): the statement that records a step, run in the
transaction that makes it, and the read of the history."""

from __future__ import annotations

import functools
from typing import Any

from sqlalchemy import Connection, Engine, String, bindparam, insert, select

from vodpush.core.requests import RequestEvent
from vodpush.persistence import dialect
from vodpush.persistence.db import read
from vodpush.persistence.models import RequestEvent as EventRow
from vodpush.persistence.models import UploadRequest

_E = EventRow.__table__
_T = UploadRequest.__table__
_COPIED = ["request_id", "at", "event", "state", "attempts", "message", "error_code"]


@functools.cache
def _record(db: dialect.Dialect) -> Any:
    """INSERT the step ``event`` of request ``rid`` as its row stands (run after the change
    it records: the state, attempts, message and error code it led to), at the database's
    time. Built once per dialect."""
    row = select(
        _T.c.id,
        db.now(),
        bindparam("event", type_=String()),
        _T.c.state,
        _T.c.attempts,
        _T.c.message,
        _T.c.error_code,
    ).where(_T.c.id == bindparam("rid"))
    return insert(_E).from_select(_COPIED, row)


def record_event(conn: Connection, db: dialect.Dialect, request_id: int, event: str) -> None:
    """Record ``event`` of ``request_id`` in the open transaction that made it."""
    conn.execute(_record(db), {"rid": request_id, "event": event})


_HISTORY = select(_E).where(_E.c.request_id == bindparam("rid")).order_by(_E.c.id)


def read_events(engine: Engine, request_id: int) -> list[RequestEvent]:
    with read(engine) as conn:
        rows = conn.execute(_HISTORY, {"rid": request_id}).all()
    return [
        RequestEvent(
            id=row.id,
            request_id=row.request_id,
            at=row.at,
            event=row.event,
            state=row.state,
            attempts=row.attempts,
            message=row.message,
            error_code=row.error_code,
        )
        for row in rows
    ]
