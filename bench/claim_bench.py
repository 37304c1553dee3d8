"""The cost of one claim (QueueStore.claim) over a backlog, on SQLite and PostgreSQL.

For each database and each account count: a fresh database, the accounts, ``--history``
finished requests (the table a service that ran for a while has) and a backlog of
``--backlog`` queued requests spread evenly over the accounts, loaded in bulk (not timed).
``--idle-accounts`` more accounts have history but nothing queued (most customers, most of
the time). Then ``--claims`` claims are timed one by one, in one thread, as a worker makes
them: after each, the oldest upload still running succeeds (not timed) once ``--in-flight``
are running, so that the claims see uploads in flight as a busy service does. Prints the
median, p90 and p99 of a claim in milliseconds (the transaction's commit included).

    .venv/bin/python bench/claim_bench.py                       # 1 and 100 accounts, both
    .venv/bin/python bench/claim_bench.py --databases sqlite --accounts 1,100,1000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

from rich.console import Console
from rich.table import Table
from sqlalchemy import create_engine, text

from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.persistence.models import UploadRequest
from vodpush.service import Service

console = Console(width=None if sys.stdout.isatty() else 120)
PG_ADMIN_URL = os.environ.get(
    "VODPUSH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CHUNK = 5_000


@contextlib.contextmanager
def fresh_database(
    kind: str, work: Path, admin_url: str, *, synchronous_commit: bool = True
) -> Iterator[str]:
    if kind == "sqlite":
        yield f"sqlite:///{work / f'claims-{uuid.uuid4().hex[:8]}.db'}"
        return
    name = f"vodpush_claims_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
        if not synchronous_commit:
            # The claim's own cost, not the wait for the disk's flush at each commit (the
            # same for any claim, and the noisiest part on a shared machine).
            conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def load(
    service: Service, accounts: list[dict], *, backlog: int, history: int, idle: int = 0
) -> None:
    """``history`` succeeded requests (a day old) dealt to every account in turn, then
    ``backlog`` queued ones dealt to all but the last ``idle`` accounts, in bulk."""
    now = datetime.now(UTC).replace(tzinfo=None)
    old = now - timedelta(days=1)

    busy = accounts[: len(accounts) - idle]

    def row(n: int, state: str, at: datetime) -> dict:
        dealt = accounts if state == "succeeded" else busy
        account = dealt[n % len(dealt)]
        return {
            "account_id": account["id"],
            "cdn_id": account["cdn"],
            "path": f"sestore1/{account['username']}/clip.mp4",
            "destination_path": f"out/{n}.mp4",
            "bucket": "bench",
            "acl": "private",
            "metadata_json": "{}",
            "callback": "",
            "signature": f"sig-{state}-{n}",
            "state": state,
            "message": "Queued" if state == "queued" else "Successfully Uploaded to AWS",
            "http_status": 0 if state == "queued" else 200,
            "attempts": 0 if state == "queued" else 1,
            "bytes_done": 0,
            "created_at": at,
            "updated_at": at,
            "not_before": at,
        }

    table = UploadRequest.__table__
    with service.database().begin() as conn:
        for start in range(0, history, CHUNK):
            stop = min(history, start + CHUNK)
            conn.execute(table.insert(), [row(n, "succeeded", old) for n in range(start, stop)])
        for start in range(0, backlog, CHUNK):
            stop = min(backlog, start + CHUNK)
            conn.execute(table.insert(), [row(n, "queued", now) for n in range(start, stop)])
    if service.engine.dialect.name == "postgresql":
        with service.database().connect() as conn:
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("ANALYZE"))


def measure(url: str, args: argparse.Namespace, count: int) -> tuple[list[float], int]:
    """Claim times in milliseconds, and how many distinct accounts the claims served."""
    settings = Settings(database_url=url, secret_key=generate_key())
    service = Service.open(settings)
    try:
        accounts = [
            service.accounts.create(cdn=1000 + i, username=f"user{i:05d}")
            for i in range(count + args.idle_accounts)
        ]
        load(service, accounts, backlog=args.backlog, history=args.history, idle=args.idle_accounts)
        queue, owner = service.queue, "bench:1"
        running: deque[int] = deque()
        served: set[int] = set()
        times = []
        for _ in range(args.warmup + args.claims):
            t0 = time.perf_counter()
            claimed = queue.claim(owner, 60)
            times.append((time.perf_counter() - t0) * 1000)
            assert claimed is not None, "the backlog ran out"
            served.add(claimed.account_id)
            running.append(claimed.id)
            if len(running) >= args.in_flight:
                queue.succeed(
                    running.popleft(),
                    owner,
                    results={},
                    http_status=200,
                    sha256="0" * 64,
                    size=1,
                    has_callback=False,
                )
        return times[args.warmup :], len(served)
    finally:
        service.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", default="sqlite,postgresql")
    parser.add_argument("--accounts", default="1,100", help="account counts to measure")
    parser.add_argument("--backlog", type=int, default=20_000, help="queued requests")
    parser.add_argument("--history", type=int, default=20_000, help="succeeded requests")
    parser.add_argument("--claims", type=int, default=500, help="claims timed")
    parser.add_argument("--warmup", type=int, default=20, help="claims not timed, first")
    parser.add_argument(
        "--idle-accounts", type=int, default=0, help="more accounts, with history, no backlog"
    )
    parser.add_argument("--in-flight", type=int, default=8, help="uploads kept running")
    parser.add_argument("--pg-url", default=PG_ADMIN_URL, help="admin URL; a fresh db is made")
    parser.add_argument(
        "--no-synchronous-commit",
        dest="synchronous_commit",
        action="store_false",
        help="PostgreSQL: commit without waiting for the disk (the statements' cost alone)",
    )
    args = parser.parse_args()

    table = Table(
        title=(
            f"One claim over {args.backlog} queued requests ({args.history} finished, "
            f"{args.in_flight} running, {args.idle_accounts} idle accounts more), "
            f"{args.claims} claims, {os.cpu_count()} CPUs"
            + ("" if args.synchronous_commit else ", PostgreSQL synchronous_commit off")
        )
    )
    for col in ("database", "accounts", "median ms", "p90 ms", "p99 ms", "accounts served"):
        table.add_column(col, justify="right")
    with tempfile.TemporaryDirectory(prefix="vodpush-claims-") as tmp:
        for kind in args.databases.split(","):
            for count in (int(c) for c in args.accounts.split(",")):
                with (
                    console.status(f"{kind}, {count} accounts"),
                    fresh_database(
                        kind, Path(tmp), args.pg_url, synchronous_commit=args.synchronous_commit
                    ) as url,
                ):
                    times, served = measure(url, args, count)
                table.add_row(
                    kind,
                    str(count),
                    f"{statistics.median(times):.2f}",
                    f"{percentile(times, 0.9):.2f}",
                    f"{percentile(times, 0.99):.2f}",
                    str(served),
                )
    console.print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
