"""Every aws.status filter is served by its index (migration 0005), on SQLite and PostgreSQL:
the statements the store runs, explained by the database itself (SQLite: EXPLAIN QUERY
PLAN; PostgreSQL: EXPLAIN after ANALYZE, on enough rows that its cost-based choice means
something). Each filter here is selective, as a filter worth an index is: the plan must
read the filter's index, for the first page, a keyset page deep in the list, and the count.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, event, text

from vodpush.core.filters import RequestFilter
from vodpush.persistence import dialect
from vodpush.persistence.listing import count_statement, probe_rows
from vodpush.persistence.requests import page_statement

ROWS = 20_000  # of the account under test; another account has a quarter as many
START = datetime(2026, 1, 1)
STEP = timedelta(seconds=60)
# One row of the account's in RARE has the rare value of every column; every row of the
# other account has the rare state, bucket and folder name (so that an index without
# account_id in front would not serve).
RARE = 1000

COLUMNS = (
    "account_id, cdn_id, path, destination_path, bucket, acl, metadata_json, callback, "
    "signature, state, message, http_status, created_at, updated_at, attempts, not_before, "
    "bytes_done, callback_state, callback_attempts, lease_expiries"
)


def _time(at: datetime) -> str:
    # As the stores write it (SQLite compares the text).
    return at.isoformat(sep=" ", timespec="microseconds")


def fill(engine: Engine, account_id: int, other_id: int) -> None:
    """ROWS requests of the account (a rare state, bucket and folder in 1 of RARE), and
    requests of another account among them (all in the rare state and bucket); then the
    planner's statistics."""
    rng = random.Random(5)
    rows = []
    for n in range(ROWS + ROWS // 4):
        mine = n % 5 != 4
        rare = not mine or rng.randrange(RARE) == 0
        at = _time(START + n * STEP)
        rows.append(
            (
                account_id if mine else other_id,
                158,
                f"sestore1/{'jb' if mine else 'other'}/{'rare' if rare else 'common'}/{n}.mp4",
                f"out/{n}.mp4",
                "rare-bucket" if rare else "bucket",
                "private",
                "{}",
                "",
                f"sig-{n}",
                "failed" if rare else "succeeded",
                "m",
                200,
                at,
                at,
                1,
                at,
                0,
                "none",
                0,
                0,
            )
        )
    marker = "%s" if engine.dialect.name == "postgresql" else "?"
    placeholders = ", ".join([marker] * len(COLUMNS.split(",")))
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.executemany(f"INSERT INTO upload_requests ({COLUMNS}) VALUES ({placeholders})", rows)
        raw.commit()
    finally:
        raw.close()
    if engine.dialect.name == "postgresql":
        # What autovacuum does on a live database: statistics, and the visibility map that
        # lets an index answer alone. (SQLite runs without statistics, as vodpush leaves
        # it.)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE upload_requests"))


@contextmanager
def explaining(engine: Engine) -> Iterator[None]:
    """Statements run on ``engine`` are explained instead (with their own bound values)."""
    prefix = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "

    def rewrite(conn: Any, cursor: Any, statement: str, parameters: Any, *args: Any) -> Any:
        return prefix + statement, parameters

    event.listen(engine, "before_cursor_execute", rewrite, retval=True)
    try:
        yield
    finally:
        event.remove(engine, "before_cursor_execute", rewrite)


def plan(engine: Engine, statement: Any) -> str:
    with explaining(engine), engine.connect() as conn:
        return "\n".join(str(row[-1]) for row in conn.execute(statement))


@pytest.fixture
def loaded(service, make_account) -> tuple[Engine, int]:
    mine, other = make_account(), make_account(cdn=159, username="other")
    fill(service.engine, mine.id, other.id)
    return service.engine, mine.id


FILTERS = {
    "state": (RequestFilter(states=("failed",)), "ix_upload_requests_account_id_state_id"),
    "created": (
        RequestFilter(created_from=START + 1000 * STEP, created_before=START + 1060 * STEP),
        "ix_upload_requests_account_id_created_at_id",
    ),
    "created_from": (
        RequestFilter(created_from=START + (ROWS + ROWS // 4 - 100) * STEP),
        "ix_upload_requests_account_id_created_at_id",
    ),
    "bucket": (RequestFilter(bucket="rare-bucket"), "ix_upload_requests_account_id_bucket_id"),
    "path_prefix": (
        RequestFilter(path_prefix="sestore1/jb/rare/"),
        "ix_upload_requests_account_id_path",
    ),
}


def page_plan(engine: Engine, account_id: int, filters: RequestFilter, **page: Any) -> str:
    page.setdefault("before_id", None)
    statement = page_statement(
        account_id,
        limit=25,
        offset=0,
        request_id=None,
        filters=filters,
        sql=dialect.for_engine(engine),
        **page,
    )
    return plan(engine, statement)


def count_plan(engine: Engine, account_id: int, filters: RequestFilter) -> str:
    sql = dialect.for_engine(engine)
    return plan(engine, count_statement(account_id, request_id=None, filters=filters, sql=sql))


def test_each_filter_reads_its_index(loaded) -> None:
    """(One test for every filter: the rows are loaded once.)"""
    engine, account_id = loaded
    deep = ROWS  # an id in the older half of the listing
    for name, (filters, index) in FILTERS.items():
        # The first page, a keyset page deep in the list, and the count.
        for before_id in (None, deep):
            shown = page_plan(engine, account_id, filters, before_id=before_id)
            assert index in shown, (name, before_id, shown)
        counted = count_plan(engine, account_id, filters)
        assert index in counted, (name, counted)

    # Several states: one newest-first range of the state index per state, merged; never
    # the account's whole listing filtered row by row.
    several = RequestFilter(states=("canceled", "failed", "retrying"))
    for before_id in (None, deep):
        shown = page_plan(engine, account_id, several, before_id=before_id)
        assert shown.count("ix_upload_requests_account_id_state_id") == 3, shown
    assert "ix_upload_requests_account_id_state_id" in count_plan(engine, account_id, several)

    # Keyset paging alone reads an index from the cursor down.
    shown = page_plan(engine, account_id, RequestFilter(), before_id=deep)
    assert "ix_upload_requests_account_id_id" in shown or "pk_upload_requests" in shown, shown
    assert "SCAN upload_requests" not in shown and "Seq Scan" not in shown, shown

    # A range filter first reads a bounded stretch of the newest requests (from the keyset
    # bound down) through the id index: a dense filter's page is found there at once.
    for name in ("created", "path_prefix"):
        filters = FILTERS[name][0]
        probe = probe_rows(filters, limit=25, offset=0)
        assert probe is not None
        for before_id in (None, deep):
            shown = page_plan(engine, account_id, filters, before_id=before_id, probe=probe)
            assert "SCAN upload_requests" not in shown and "Seq Scan" not in shown, shown
            if engine.dialect.name == "sqlite":
                # (PostgreSQL weighs the filter's index against it with its statistics:
                # both read a bounded stretch.)
                assert "ix_upload_requests_account_id_id (account_id=? AND id>?" in shown, shown
                assert "ix_upload_requests_account_id_path" not in shown, shown
                assert "ix_upload_requests_account_id_created_at_id" not in shown, shown
    # Equality filters need no probe: their index keeps the listing's order.
    assert probe_rows(FILTERS["state"][0], limit=25, offset=0) is None
    assert probe_rows(FILTERS["bucket"][0], limit=25, offset=0) is None
