"""Upload drain rate with 1 account and with 100, under mixed API load, on PostgreSQL.

For each account count in turn (1, then 100 by default, in one run): a fresh PostgreSQL
database, a fresh moto S3 server process on 127.0.0.1, one small file per account in the
sestore, and the accounts: even-numbered ones with their own S3 keys (each its own pair),
odd-numbered ones with none, so they upload with the operator's default credentials (the
workers' AWS_* variables). Then:

1. Drain: a backlog of ``--backlog`` requests is queued beforehand (the rows
   ``RequestStore.enqueue`` writes, in one statement; not timed); an API process (``vodpush serve
   --no-worker``) takes mixed load over HTTP (aws.upload at ``--drain-upload-rate`` and
   aws.status at ``--status-rate`` a second, signed like the PHP client, spread over the
   accounts) and two worker processes (``python -m vodpush worker``) start. The drain rate
   is the count of succeeded requests over ``--duration`` seconds, from ``--warmup`` seconds
   after the first success (process start-up excluded; building S3 clients included).
2. Trend: the rest of the backlog is dropped, and aws.upload is sent at a fixed rate below
   the 1-account drain rate (``--below`` times it, the same rate for every account count)
   for ``--trend-seconds``; the queue depth (queued + running) is sampled each second and
   its least-squares slope reported: about 0 when the workers keep up.

Prints both drain rates, their ratio (target >= 0.9) and the depth trends.

    make bench-accounts
    .venv/bin/python bench/many_accounts.py --accounts 1,100 --duration 20 --trend-seconds 20
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import boto3
import httpx
from rich.console import Console
from rich.table import Table
from sqlalchemy import Engine, create_engine, text

from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.crypto import generate_key
from vodpush.persistence.models import UploadRequest
from vodpush.protocol.signing import sign_request
from vodpush.service import Service

console = Console(width=None if sys.stdout.isatty() else 120)
PG_ADMIN_URL = os.environ.get(
    "VODPUSH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REGION = "us-east-1"
OPERATOR = {"key": "AKIAOPERATOR", "secret": "operator-secret"}
BUCKET = "bench-accounts"
FILE_BYTES = 1024
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


# -- processes -------------------------------------------------------------------------------


class Processes:
    """Every process the benchmark starts, stopped (by pid) on the way out."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with open(self.work / f"{name}.log", "ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **env},
                start_new_session=True,  # Ctrl-C is ours to handle
            )
        self.running.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(ValueError):
            self.running.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.running)):
            self.stop(proc, timeout=10)


def wait_answers(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answered
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


@contextlib.contextmanager
def fresh_database(admin_url: str) -> Iterator[str]:
    name = f"vodpush_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


# -- the API load ----------------------------------------------------------------------------


@dataclass
class Account:
    id: int
    cdn: int
    username: str
    api_key: str
    api_secret: str


@dataclass
class Paced:
    """Calls at a fixed rate (from a schedule, not after each answer), on a small pool."""

    rate: float
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


class ApiLoad:
    """aws.upload and aws.status over HTTP at fixed rates, spread over the accounts."""

    def __init__(self, url: str, accounts: list[Account]) -> None:
        self.url = url
        self.accounts = accounts
        self.uploads = Paced(0.0)
        self.status = Paced(0.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(16, thread_name_prefix="load")
        self._threads = [
            threading.Thread(target=self._pace, args=(p, self._upload), daemon=True)
            for p in (self.uploads,)
        ] + [threading.Thread(target=self._pace, args=(self.status, self._status), daemon=True)]
        self._n = 0

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._pool.shutdown(wait=True)

    def _pace(self, paced: Paced, call: Any) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            if paced.rate <= 0:
                self._stop.wait(0.05)
                next_at = time.monotonic()
                continue
            next_at += 1 / paced.rate
            delay = next_at - time.monotonic()
            if delay > 0:
                self._stop.wait(delay)
            self._pool.submit(self._send, paced, call)

    def _client(self) -> httpx.Client:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._local.client = httpx.Client(timeout=30)
        return client

    def _send(self, paced: Paced, call: Any) -> None:
        with self._lock:
            self._n += 1
            n = self._n
        account = self.accounts[n % len(self.accounts)]
        payload = {
            "api_key": account.api_key,
            "cdn": account.cdn,
            "timestamp": int(time.time()),
            **call(account, n),
        }
        body = "json=" + quote(sign_request(payload, account.api_secret), safe="")
        try:
            answer = (
                self._client()
                .post(
                    self.url,
                    content=body,
                    headers={"content-type": "application/x-www-form-urlencoded"},
                )
                .json()
            )
            ok = answer.get("status") == "success"
            error = "" if ok else str(answer.get("message"))
        except (httpx.HTTPError, ValueError) as exc:
            ok, error = False, f"{type(exc).__name__}: {exc}"
        with self._lock:
            paced.sent += 1
            if not ok:
                paced.failed += 1
                if len(paced.errors) < 5:
                    paced.errors.append(error)

    def _upload(self, account: Account, n: int) -> dict[str, Any]:
        return {
            "command": "aws.upload",
            "path": f"sestore1/{account.username}/clip.mp4",
            "destination_path": f"api/{account.username}/{n}-{uuid.uuid4().hex[:8]}.mp4",
            "bucket": BUCKET,
            "acl": "private",
        }

    def _status(self, account: Account, n: int) -> dict[str, Any]:
        return {"command": "aws.status", "limit": 25, "offset": 0}


# -- one account count -------------------------------------------------------------------------


@dataclass
class Result:
    accounts: int
    drain_rate: float = 0.0
    backlog_left: int = 0
    worker_cpu_per_upload_ms: float = 0.0
    trend_rate: float = 0.0
    trend_slope: float = 0.0
    depth_start: int = 0
    depth_end: int = 0
    depth_max: int = 0
    trend_succeeded_rate: float = 0.0
    trend_sent_rate: float = 0.0  # what the API accepted (the pacer may fall behind)
    api: dict[str, str] = field(default_factory=dict)


def states(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT state, count(*) FROM upload_requests GROUP BY state"))
        return {state: int(count) for state, count in rows}


def depth(counts: dict[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("queued", "running", "retrying"))


def slope(points: list[tuple[float, float]]) -> float:
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (y - mean_y) for t, y in points) / var if var else 0.0


class Scenario:
    def __init__(self, args: argparse.Namespace, work: Path, count: int, rep: int) -> None:
        self.args = args
        self.count = count
        self.work = work / f"accounts-{count}-{rep + 1}"
        self.work.mkdir()
        self.procs = Processes(self.work)
        self.key = generate_key()

    def run(self, trend_rate: float | None) -> Result:
        try:
            with fresh_database(self.args.pg_url) as db_url:
                return self._run(db_url, trend_rate)
        finally:
            self.procs.stop_all()

    def _run(self, db_url: str, trend_rate: float | None) -> Result:
        args, result = self.args, Result(self.count)
        moto_port = free_port()
        moto = self.procs.start(
            "moto",
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(moto_port)],
            {},
        )
        moto_url = f"http://127.0.0.1:{moto_port}"
        wait_answers(f"{moto_url}/moto-api/", moto)
        boto3.client(
            "s3",
            endpoint_url=moto_url,
            region_name=REGION,
            aws_access_key_id=OPERATOR["key"],
            aws_secret_access_key=OPERATOR["secret"],
        ).create_bucket(Bucket=BUCKET)

        sestore = self.work / "sestore"
        settings = Settings(database_url=db_url, secret_key=self.key, sestore_root=sestore)
        service = Service.open(settings)
        accounts = []
        try:
            for i in range(self.count):
                username = f"user{i:04d}"
                own = i % 2 == 0
                s3 = (
                    S3Settings(
                        endpoint_url=moto_url,
                        region=REGION,
                        access_key_id=f"AKIABENCH{i:05d}",
                        secret_access_key=f"bench-secret-{i}",
                    )
                    if own
                    else S3Settings()
                )
                made = service.accounts.create(cdn=1000 + i, username=username, s3=s3)
                if not own:  # the operator's credentials reach no bucket until allowed
                    service.accounts.allow_buckets(made["api_key"], [BUCKET])
                accounts.append(Account(**{k: made[k] for k in Account.__dataclass_fields__}))
                user_dir = sestore / "sestore1" / username
                user_dir.mkdir(parents=True)
                (user_dir / "clip.mp4").write_bytes(os.urandom(FILE_BYTES))
            # The backlog in one statement: the rows RequestStore.enqueue writes.
            now = datetime.now(UTC).replace(tzinfo=None)
            rows = []
            for n in range(args.backlog):
                account = accounts[n % len(accounts)]
                rows.append(
                    {
                        "account_id": account.id,
                        "cdn_id": account.cdn,
                        "path": f"sestore1/{account.username}/clip.mp4",
                        "destination_path": f"backlog/{account.username}/{n}.mp4",
                        "bucket": BUCKET,
                        "acl": "private",
                        "metadata_json": "{}",
                        "callback": "",
                        "signature": f"backlog-{n}",
                        "state": "queued",
                        "message": "Queued",
                        "http_status": 0,
                        "attempts": 0,
                        "bytes_done": 0,
                        "created_at": now,
                        "updated_at": now,
                        "not_before": now,
                    }
                )
            with service.database().begin() as conn:
                conn.execute(UploadRequest.__table__.insert(), rows)
        finally:
            service.close()

        env = {
            "VODPUSH_DATABASE_URL": db_url,
            "VODPUSH_SECRET_KEY": self.key,
            "VODPUSH_SESTORE_ROOT": str(sestore),
            "VODPUSH_RATE_LIMIT": "0",  # one load generator sends for every account
            "AWS_ACCESS_KEY_ID": OPERATOR["key"],
            "AWS_SECRET_ACCESS_KEY": OPERATOR["secret"],
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL_S3": moto_url,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        api_port = free_port()
        api = self.procs.start(
            "api",
            [sys.executable, "-m", "vodpush", "serve", "--no-worker", "--port", str(api_port)],
            env,
        )
        api_url = f"http://127.0.0.1:{api_port}/stable/"
        wait_answers(f"http://127.0.0.1:{api_port}/healthz", api)

        engine = create_engine(db_url)
        load = ApiLoad(api_url, accounts)
        load.uploads.rate = args.drain_upload_rate
        load.status.rate = args.status_rate
        load.start()
        try:
            workers = [
                self.procs.start(f"worker{n}", [sys.executable, "-m", "vodpush", "worker"], env)
                for n in range(args.workers)
            ]
            self._drain(engine, workers, result)
            load.uploads.rate = 0
            with engine.begin() as conn:  # the rest of the backlog: not this phase's
                conn.execute(text("DELETE FROM upload_requests WHERE state = 'queued'"))
            self._wait_idle(engine)
            result.trend_rate = trend_rate if trend_rate is not None else 0.0
            if trend_rate is None:
                result.trend_rate = args.below * result.drain_rate
            load.uploads.rate = result.trend_rate
            self._trend(engine, result, load)
        finally:
            load.stop()
            engine.dispose()
        for name, paced in (("aws.upload", load.uploads), ("aws.status", load.status)):
            result.api[name] = f"{paced.sent} sent, {paced.failed} failed" + (
                f" ({paced.errors[0]})" if paced.errors else ""
            )
        return result

    def _drain(
        self, engine: Engine, workers: list[subprocess.Popen[bytes]], result: Result
    ) -> None:
        args = self.args
        deadline = time.monotonic() + 120
        while states(engine).get("succeeded", 0) == 0:
            if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
                raise RuntimeError(f"no upload succeeded; see {self.work}/worker*.log")
            time.sleep(0.1)
        time.sleep(args.warmup)
        cpu0 = sum(cpu_seconds(w.pid) for w in workers)
        t0, done0 = time.monotonic(), states(engine).get("succeeded", 0)
        with console.status(f"{self.count} accounts: measuring the drain rate"):
            time.sleep(args.duration)
        counts = states(engine)
        t1, done1 = time.monotonic(), counts.get("succeeded", 0)
        cpu1 = sum(cpu_seconds(w.pid) for w in workers)
        result.drain_rate = (done1 - done0) / (t1 - t0)
        result.backlog_left = counts.get("queued", 0)
        result.worker_cpu_per_upload_ms = 1000 * (cpu1 - cpu0) / max(1, done1 - done0)
        if counts.get("failed"):
            console.print(f"[red]{counts['failed']} uploads failed: see {self.work}[/red]")
        if result.backlog_left == 0:
            console.print("[yellow]the backlog ran out: the drain rate is a lower bound[/]")

    def _wait_idle(self, engine: Engine, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while depth(states(engine)) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _trend(self, engine: Engine, result: Result, load: ApiLoad) -> None:
        points: list[tuple[float, float]] = []
        start = time.monotonic()
        done0 = states(engine).get("succeeded", 0)
        sent0 = load.uploads.sent - load.uploads.failed
        with console.status(
            f"{self.count} accounts: queueing {result.trend_rate:.1f}/s, watching the depth"
        ):
            while (now := time.monotonic()) - start < self.args.trend_seconds:
                points.append((now - start, depth(states(engine))))
                time.sleep(1.0)
        done1 = states(engine).get("succeeded", 0)
        result.trend_slope = slope(points)
        result.depth_start, result.depth_end = int(points[0][1]), int(points[-1][1])
        result.depth_max = int(max(y for _, y in points))
        elapsed = time.monotonic() - start
        result.trend_succeeded_rate = (done1 - done0) / elapsed
        result.trend_sent_rate = (load.uploads.sent - load.uploads.failed - sent0) / elapsed


# -- main ------------------------------------------------------------------------------------


def report(results: list[Result], counts: list[int], args: argparse.Namespace) -> bool:
    table = Table(
        title=(
            f"Drain with {args.workers} workers, PostgreSQL, moto, {FILE_BYTES} B files, "
            f"API load {args.drain_upload_rate:g} aws.upload/s + {args.status_rate:g} "
            f"aws.status/s, {os.cpu_count()} CPUs"
        )
    )
    for col in (
        "accounts",
        "drain uploads/s",
        "worker CPU ms/upload",
        "left in backlog",
        "trend: queued/s (done)",
        "uploaded/s",
        "depth start→end (max)",
        "depth slope /s",
    ):
        table.add_column(col, justify="right")
    for r in sorted(results, key=lambda r: r.accounts):
        table.add_row(
            str(r.accounts),
            f"{r.drain_rate:.1f}",
            f"{r.worker_cpu_per_upload_ms:.0f}",
            str(r.backlog_left),
            f"{r.trend_rate:.1f} ({r.trend_sent_rate:.1f})",
            f"{r.trend_succeeded_rate:.1f}",
            f"{r.depth_start}→{r.depth_end} ({r.depth_max})",
            f"{r.trend_slope:+.2f}",
        )
    console.print(table)
    for r in results:
        api = "; ".join(f"{k} {v}" for k, v in r.api.items())
        console.print(f"{r.accounts} accounts, API: {api}")
    drains = {
        c: statistics.median(r.drain_rate for r in results if r.accounts == c) for c in counts
    }
    base, ok = counts[0], True
    console.print(
        "drain uploads/s (median of "
        f"{args.repeat}): " + ", ".join(f"{c} accounts {d:.1f}" for c, d in drains.items())
    )
    for count in counts[1:]:
        ratio = drains[count] / drains[base] if drains[base] else 0.0
        met = ratio >= args.target
        # Growing: the depth rises by more than a tenth of the queueing rate each second.
        trends = [r for r in results if r.accounts == count]
        grows = any(r.trend_slope > 0.1 * r.trend_rate for r in trends)
        ok &= met and not grows
        console.print(
            f"drain ratio {count} / {base} accounts: {ratio:.2f} "
            f"(target >= {args.target:g}: {'met' if met else 'NOT met'}); queued at "
            f"{trends[0].trend_rate:.1f}/s ({args.below:g} x the {base}-account rate) the "
            f"queue {'grows' if grows else 'does not grow'} (slope "
            + ", ".join(f"{r.trend_slope:+.2f}" for r in trends)
            + "/s)"
        )
    return ok


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", default="1,100", help="account counts, the first is the base")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--backlog", type=int, default=3000, help="requests queued beforehand")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the 1st upload")
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of drain measured")
    parser.add_argument("--drain-upload-rate", type=float, default=5.0, help="aws.upload/s")
    parser.add_argument("--status-rate", type=float, default=10.0, help="aws.status/s")
    parser.add_argument("--below", type=float, default=0.8, help="trend rate / base drain rate")
    parser.add_argument("--trend-seconds", type=float, default=30.0)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--repeat", type=int, default=1, help="runs per account count (median)")
    parser.add_argument(
        "--pg-url", default=PG_ADMIN_URL, help="admin URL; a fresh database is made"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = parser.parse_args()
    counts = [int(c) for c in args.accounts.split(",") if c]

    work = Path(tempfile.mkdtemp(prefix="vodpush-accounts-bench-"))
    results: list[Result] = []
    previous = signal.signal(signal.SIGTERM, _interrupt)  # unwind: the finally blocks clean up
    try:
        for rep in range(args.repeat):
            # Every other repeat in reverse order: no account count always runs first.
            for count in counts if rep % 2 == 0 else counts[::-1]:
                trend_rate = args.below * results[0].drain_rate if results else None
                result = Scenario(args, work, count, rep).run(trend_rate)
                results.append(result)
                console.print(
                    f"[dim]{rep + 1}/{args.repeat} {count} accounts: drain "
                    f"{result.drain_rate:.1f}/s, trend slope {result.trend_slope:+.2f}/s at "
                    f"{result.trend_rate:.1f}/s[/dim]"
                )
        ok = report(results, counts, args)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.keep:
            console.print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
