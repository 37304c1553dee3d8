"""aws.status filters and keyset paging on one account with 50,000 requests (and as many of
other accounts beside them): what a first page, a page deep in the list by after_id, the
same depth by offset, and the `total` count cost, for each filter, through the operation
the API runs (vodpush.operations.status) on SQLite and PostgreSQL. Not part of the tests.

    .venv/bin/python bench/status_filters.py                      # SQLite (a fresh file)
    .venv/bin/python bench/status_filters.py \\
        --postgresql postgresql+psycopg://postgres@127.0.0.1:5432/postgres

With --postgresql, a throwaway database is created beside the one the URL names (its user
must be allowed to) and dropped at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.operations import OperationContext, StatusQuery, status
from vodpush.service import Service

console = Console()
START = datetime(2026, 1, 1)
STEP = timedelta(seconds=2)
STATES = ["succeeded"] * 80 + ["failed"] * 5 + ["queued"] * 10 + ["retrying"] * 3 + ["running"] * 2
COLUMNS = (
    "account_id, cdn_id, path, destination_path, bucket, acl, metadata_json, callback, "
    "signature, state, message, results_json, http_status, created_at, updated_at, attempts, "
    "not_before, bytes_done, bytes_total, callback_state, callback_attempts, lease_expiries"
)
RESULTS = (
    '{"Bucket": "bucket", "ETag": "\\"d41d8cd98f00b204e9800998ecf8427e\\"", '
    '"Key": "k", "ServerSideEncryption": "AES256"}'
)


def fill(service: Service, *, rows: int, others: int) -> tuple[Any, int]:
    """``rows`` requests of one account (user0), ``others`` of 10 more accounts, interleaved
    in time; user0's in folders: 'shows/<n // 1000>/' and 1 in 500 in 'rare/'."""
    accounts = [service.accounts.create(cdn=1000 + i, username=f"user{i}") for i in range(11)]
    rng = random.Random(1)
    dialect = service.engine.dialect.name  # type: ignore[union-attr]
    marker = "%s" if dialect == "postgresql" else "?"
    sql = (
        f"INSERT INTO upload_requests ({COLUMNS}) "
        f"VALUES ({', '.join([marker] * len(COLUMNS.split(',')))})"
    )
    total = rows + others
    mine_every = total / rows
    batch: list[tuple[Any, ...]] = []
    raw = service.engine.raw_connection()  # type: ignore[union-attr]
    cursor = raw.cursor()
    mine_count = 0
    for n in range(total):
        mine = mine_count < rows and n >= mine_count * mine_every
        account = accounts[0] if mine else accounts[1 + rng.randrange(10)]
        mine_count += mine
        at = (START + n * STEP).isoformat(sep=" ", timespec="microseconds")
        state = rng.choice(STATES)
        folder = "rare" if mine and rng.randrange(500) == 0 else f"shows/{n // 1000}"
        batch.append(
            (
                account["id"],
                account["cdn"],
                f"sestore1/{account['username']}/{folder}/{n}.mp4",
                f"out/{n}.mp4",
                f"bucket-{n % 7}",
                "private",
                '{"title": "episode"}',
                "",
                f"sig{n}",
                state,
                "Successfully Uploaded to AWS" if state == "succeeded" else state,
                RESULTS if state == "succeeded" else None,
                200 if state == "succeeded" else 0,
                at,
                at,
                1,
                at,
                1048576,
                1048576,
                "none",
                0,
                0,
            )
        )
        if len(batch) == 10_000:
            cursor.executemany(sql, batch)
            batch.clear()
    if batch:
        cursor.executemany(sql, batch)
    raw.commit()
    raw.close()
    if dialect == "postgresql":
        # What autovacuum does on a live database.
        with service.engine.connect().execution_options(  # type: ignore[union-attr]
            isolation_level="AUTOCOMMIT"
        ) as conn:
            conn.execute(text("VACUUM ANALYZE upload_requests"))
    return service.accounts.find("1000/user0"), total


def timed(run: Callable[[], Any], repeat: int) -> str:
    """Milliseconds of ``repeat`` runs (after one to warm up): the best and the median.
    The best is the cost itself; the median adds what other processes took of the CPU."""
    run()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        samples.append((time.perf_counter() - started) * 1000)
    return f"{min(samples):.2f} / {statistics.median(samples):.2f}"


CASES: dict[str, dict[str, Any]] = {
    "none (documented page)": {},
    "state=failed (5%)": {"state": "failed"},
    "state=failed,retrying (8%)": {"state": ["failed", "retrying"]},
    "state=canceled (none)": {"state": "canceled"},
    "bucket (1 in 7)": {"bucket": "bucket-3"},
    "created: one day (~20%)": {
        "created_from": "2026-01-02 00:00:00",
        "created_to": "2026-01-02 23:59:59",
    },
    "created_from: from day 2 (~90%)": {"created_from": "2026-01-02 00:00:00"},
    "path_prefix: whole dir (100%)": {"path_prefix": "sestore1/user0/"},
    "path_prefix: one folder (1%)": {"path_prefix": "sestore1/user0/shows/7/"},
    "path_prefix: rare (0.2%)": {"path_prefix": "sestore1/user0/rare/"},
    "state+bucket+created": {
        "state": ["failed", "queued"],
        "bucket": "bucket-3",
        "created_from": "2026-01-01 12:00:00",
    },
}


def measure(service: Service, account: Any, *, limit: int, repeat: int) -> Table:
    ctx = OperationContext(account=account, settings=service.settings, requests=service.requests)
    table = Table(
        "filter",
        "matches",
        "first page",
        "deep page (after_id)",
        "deep page (offset)",
        "total alone",
        "first page + total",
        title=f"aws.status, limit {limit}: ms, best / median ({service.engine.dialect.name})",  # type: ignore[union-attr]
    )
    for name, fields in CASES.items():
        query = StatusQuery.from_values({**fields, "limit": limit}, service.settings)
        filters = query.filters()
        where = None if filters.empty else filters
        matches = service.requests.count_for_account(account.id, filters=where)
        depth = max(0, int(matches * 0.9) - limit)  # 90% down the filtered list
        cursor_rows = service.requests.list_for_account(
            account.id, limit=1, offset=depth, filters=where
        )
        after_id = cursor_rows[0].id if cursor_rows else None

        def page(after: int | None = None, offset: int = 0, w: Any = where) -> Any:
            return service.requests.list_for_account(
                account.id, limit=limit, offset=offset, filters=w, before_id=after
            )

        first = timed(page, repeat)
        deep = timed(lambda a=after_id: page(after=a), repeat) if after_id else "-"
        by_offset = timed(lambda d=depth: page(offset=d), repeat)
        count = timed(
            lambda w=where: service.requests.count_for_account(account.id, filters=w), repeat
        )
        extended = StatusQuery.from_values(
            {**fields, "limit": limit, "after_id": 2**40}, service.settings
        )
        both = timed(lambda q=extended: status(ctx, q), repeat)
        table.add_row(name, f"{matches:,}", first, deep, by_offset, count, both)
    return table


@contextmanager
def database(args: argparse.Namespace, work: Path) -> Iterator[str]:
    if not args.postgresql:
        yield f"sqlite:///{work / 'bench.db'}"
        return
    admin_url = make_url(args.postgresql)
    name = f"vodpush_bench_filters_{os.getpid()}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=50_000, help="requests of the account")
    parser.add_argument("--others", type=int, default=50_000, help="of 10 other accounts")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--postgresql", metavar="ADMIN_URL", help="run on PostgreSQL")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vodpush-bench-filters-"))
    with database(args, work) as url:
        settings = Settings(
            database_url=url,
            secret_key=generate_key(),
            secret_key_file=work / "key",
            sestore_root=work,
            status_max_limit=max(1000, args.limit),
        )
        service = Service.open(settings)
        try:
            started = time.monotonic()
            account, total = fill(service, rows=args.rows, others=args.others)
            console.print(
                f"loaded {total:,} requests ({args.rows:,} of the account) in "
                f"{time.monotonic() - started:.1f} s"
            )
            console.print(measure(service, account, limit=args.limit, repeat=args.repeat))
        finally:
            service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
