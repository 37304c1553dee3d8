"""A soak of vodpush under faults: API load from many accounts while workers upload and
faults are injected at random, then a drain and a check of what must never happen.

Everything runs on loopback: a fresh PostgreSQL database on the shared server (created and
dropped here), a moto S3 server process with versioning on in every bucket (so a second
write of a key shows as a second version), the fault proxy in front of it, a callback
receiver, `vodpush serve --no-worker` API processes and `vodpush worker` processes. The
load generator signs real aws.upload and aws.status calls (vodpush_client) from every
account; the faults (bench/soak_faults.py) kill, stop and starve the workers, cut S3 and
the callback receiver, and kill the workers' database connections.

At the end the load stops, every fault is undone, the workers drain the queue (bounded),
and a table shows requests, uploads, duplicates, orphaned multipart uploads, callbacks
delivered twice and API latency; the exit status is 1 when a target is missed.

    make soak                                   # 600 s (SOAK_SECONDS overrides)
    .venv/bin/python -m bench.soak --seconds 60 --seed 7
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import boto3
from rich.console import Console
from tests.s3server import MotoServer

from bench.soak_cluster import (
    HARNESS_APP,
    Database,
    Processes,
    ProxyProcess,
    process_env,
)
from bench.soak_faults import Faults
from bench.soak_load import Account, Load
from bench.soak_receiver import Receiver
from bench.soak_report import Outcome, log_problems, read_objects, read_requests, render
from vodpush.config import Settings
from vodpush.core.accounts import S3Settings
from vodpush.crypto import generate_key
from vodpush.service import Service

console = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
MiB = 1024 * 1024
PG_ADMIN_URL = os.environ.get(
    "VODPUSH_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CREDS = {"region": "us-east-1", "access_key_id": "testing", "secret_access_key": "testing"}
BUCKETS = tuple(f"soak-{i:02d}" for i in range(10))
BIG_SIZES = (6 * MiB, 11 * MiB, 16 * MiB)  # 2, 3 and 4 parts of 5 MiB


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("SOAK_SECONDS", 600)),
        help="seconds of load and faults [SOAK_SECONDS, 600]",
    )
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice")
    p.add_argument("--accounts", type=int, default=100)
    p.add_argument("--apis", type=int, default=2, help="API processes")
    p.add_argument("--workers", type=int, default=3, help="worker processes")
    p.add_argument("--worker-concurrency", type=int, default=4)
    p.add_argument("--lease", type=int, default=10, help="VODPUSH_LEASE_SECONDS")
    p.add_argument("--upload-rate", type=float, default=1.0, help="aws.upload calls a second")
    p.add_argument("--status-rate", type=float, default=5.0, help="aws.status calls a second")
    p.add_argument("--big-fraction", type=float, default=0.1, help="uploads of multipart size")
    p.add_argument("--callback-fraction", type=float, default=0.5, help="uploads with a callback")
    p.add_argument("--fault-gap", type=float, default=15.0, help="mean seconds between faults")
    p.add_argument("--no-faults", action="store_true", help="the same load, nothing injected")
    p.add_argument("--drain-seconds", type=float, default=300.0, help="bound on the drain")
    p.add_argument("--pg-admin-url", default=PG_ADMIN_URL)
    p.add_argument("--keep", action="store_true", help="keep the temp dir and the database")
    return p.parse_args(argv)


def say(text: str) -> None:
    console.print(text, markup=False)


# -- setup ----------------------------------------------------------------------------------


def make_files(root: Path, rng: random.Random, accounts: int) -> tuple[list[list[str]], list[str]]:
    """Per account, four small files (1 KiB to 1 MiB) and a hard link to one big file."""
    big_dir = root.parent / "big"
    big_dir.mkdir()
    bigs = []
    for size in BIG_SIZES:
        path = big_dir / f"big-{size // MiB}m.mp4"
        path.write_bytes(rng.randbytes(size))
        bigs.append(path)
    small, big = [], []
    for i in range(accounts):
        user = f"soak{i:03d}"
        home = root / "sestore1" / user / "videos"
        home.mkdir(parents=True)
        names = []
        for n in range(4):
            size = int(2 ** rng.uniform(10, 20))
            (home / f"clip{n}.mp4").write_bytes(rng.randbytes(size))
            names.append(f"sestore1/{user}/videos/clip{n}.mp4")
        source = bigs[i % len(bigs)]
        os.link(source, home / source.name)
        small.append(names)
        big.append(f"sestore1/{user}/videos/{source.name}")
    return small, big


def make_accounts(
    service: Service, proxy_url: str, api_urls: list[str], small: list[list[str]], big: list[str]
) -> list[Account]:
    accounts = []
    for i, (files, big_file) in enumerate(zip(small, big, strict=True)):
        created = service.accounts.create(
            cdn=1000 + i, username=f"soak{i:03d}", s3=S3Settings(endpoint_url=proxy_url, **CREDS)
        )
        service.accounts.allow_buckets(created["api_key"], ["soak-*"])
        accounts.append(
            Account(
                index=i,
                username=created["username"],
                cdn=created["cdn"],
                api_key=created["api_key"],
                api_secret=created["api_secret"],
                bucket=BUCKETS[i % len(BUCKETS)],
                files=tuple(files),
                big=big_file,
                api_url=api_urls[i % len(api_urls)],
            )
        )
    return accounts


@contextmanager
def database(admin_url: str, keep: bool) -> Iterator[Database]:
    db = Database(admin_url).create()
    try:
        yield db
    finally:
        if keep:
            say(f"kept database {db.name}")
        else:
            db.drop()


# -- the run --------------------------------------------------------------------------------


def wait_drained(service: Service, seconds: float) -> tuple[bool, float]:
    started = time.monotonic()
    last = 0.0
    while True:
        depth = service.queue.depth()
        left = depth["queued"] + depth["running"] + depth["retrying"] + depth["callbacks_pending"]
        waited = time.monotonic() - started
        if left == 0:
            return True, waited
        if waited > seconds:
            say(f"not drained after {seconds:.0f} s: {depth}")
            return False, waited
        if waited - last >= 15:
            last = waited
            say(f"draining: {depth}")
        time.sleep(1)


def progress(service: Service, load: Load, faults: Faults | None, t: float) -> None:
    depth = service.queue.depth()
    say(
        f"[{t:7.1f} s] calls {sum(len(v) for v in load.latencies.values())}, "
        f"uploads queued {sum(depth[s] for s in ('queued', 'running', 'retrying'))}, "
        f"succeeded {depth['succeeded']}, failed {depth['failed']}, "
        f"callbacks pending {depth['callbacks_pending']}, "
        f"faults {sum(faults.counts.values()) if faults else 0}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(10**6)
    rng = random.Random(seed)
    say(
        f"vodpush soak: seed {seed}, {args.seconds:.0f} s, {args.accounts} accounts, "
        f"{args.apis} API and {args.workers} worker processes, lease {args.lease} s"
    )
    tmp = Path(tempfile.mkdtemp(prefix="vodpush-soak-"))
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"  # never ask 169.254.169.254
    with ExitStack() as stack:
        if not args.keep:
            stack.callback(shutil.rmtree, tmp, ignore_errors=True)
        else:
            say(f"keeping {tmp}")
        db = stack.enter_context(database(args.pg_admin_url, args.keep))
        secret_key = generate_key()
        sestore = tmp / "stores"
        settings = Settings(
            database_url=db.url(HARNESS_APP), sestore_root=sestore, secret_key=secret_key
        )
        service = Service.open(settings)  # migrates the new database
        stack.callback(service.close)
        small, big = make_files(sestore, rng, args.accounts)

        moto = MotoServer(
            env={"MOTO_S3_DEFAULT_KEY_BUFFER_SIZE": str(256 * 1024)}, log_dir=tmp
        ).start()
        stack.callback(moto.stop)
        s3 = boto3.client(
            "s3",
            endpoint_url=moto.url,
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        for bucket in BUCKETS:
            s3.create_bucket(Bucket=bucket)
            s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
        proxy = ProxyProcess(moto.port, seed, tmp / "proxy.log")
        stack.callback(proxy.stop)

        env = process_env(
            secret_key,
            sestore,
            tmp,
            lease_seconds=str(args.lease),
            poll_interval="0.2",
            multipart_threshold=str(5 * MiB),
            multipart_chunksize=str(5 * MiB),
            part_concurrency="2",
            callback_allow_private="true",
            callback_timeout="3",
            callback_schedule="[1, 2, 5, 10, 20, 30, 60]",
            retry_base_delay="1",
            retry_max_delay="30",
            shutdown_grace="5",
        )
        processes = Processes(env, db, tmp)
        stack.callback(processes.stop_all, 5)
        for _ in range(args.apis):
            processes.start_api()
        for _ in range(args.workers):
            processes.start_worker(args.worker_concurrency)

        accounts = make_accounts(service, proxy.url, processes.api_urls, small, big)
        processes.wait_started()
        receiver = Receiver({a.username: a.api_secret for a in accounts})
        receiver.start()
        stack.callback(receiver.stop)
        say(
            f"ready: moto {moto.url}, proxy {proxy.url}, receiver :{receiver.port}, "
            f"APIs {' '.join(processes.api_urls)}, database {db.name}, files in {tmp}"
        )

        load = Load(
            accounts,
            receiver.url,
            seed=seed,
            upload_rate=args.upload_rate,
            status_rate=args.status_rate,
            callback_fraction=args.callback_fraction,
            big_fraction=args.big_fraction,
        )
        stop = threading.Event()
        started = time.monotonic()
        faults = None
        threads = [threading.Thread(target=load.run, args=(stop,), name="load")]
        if not args.no_faults:
            faults = Faults(
                processes=processes,
                proxy=proxy,
                receiver=receiver,
                database=db,
                seed=seed + 1,
                lease_seconds=args.lease,
                worker_concurrency=args.worker_concurrency,
                mean_gap=args.fault_gap,
                started=started,
                say=say,
            )
            threads.append(threading.Thread(target=faults.run, args=(stop,), name="faults"))
        for thread in threads:
            thread.start()
        try:
            while (t := time.monotonic() - started) < args.seconds:
                time.sleep(min(15.0, args.seconds - t))
                progress(service, load, faults, time.monotonic() - started)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            load.finish()
            if faults is not None:
                faults.restore()
        load_seconds = time.monotonic() - started
        say(f"load stopped after {load_seconds:.0f} s; faults undone; draining")
        drained, drain_seconds = wait_drained(service, args.drain_seconds)
        exits = processes.stop_all(5)
        say(
            "exits on SIGTERM: "
            + ", ".join(
                f"{e.name} {e.code} in {e.seconds:.0f} s" + (" (hung: SIGABRT)" if e.hung else "")
                for e in exits
            )
        )

        outcome = Outcome(
            drained=drained,
            drain_seconds=drain_seconds,
            requests=read_requests(service.database()),
            objects=read_objects(s3, BUCKETS),
            callbacks=receiver.figures(),
            load=load,
            faults=faults.counts if faults else Counter(),
            problems=log_problems(processes.logs()),
            deliveries=receiver.deliveries(),
        )
        missed = render(console, outcome, seed=seed, seconds=load_seconds)
        if missed:
            say(f"MISSED ({len(missed)}): " + "; ".join(missed) + f"  [seed {seed}]")
            return 1
        say(f"all targets met [seed {seed}]")
        return 0


if __name__ == "__main__":
    sys.exit(main())
