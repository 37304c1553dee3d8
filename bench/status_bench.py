"""aws.status on a table of 1,000,000 requests (100 accounts), over HTTP, side by side with
a bare Starlette endpoint returning constant JSON (bench/bare_app.py).

Both servers run as separate processes under the same uvicorn configuration; wrk drives them
with the same pre-signed requests (a signature stays valid for the ±300 s window, and
aws.status has no replay guard because it changes nothing). Prints p50/p99 latency at one
connection (the service time of one call) and at --connections (under load), requests per
second, and the ratio vodpush / bare.

    make bench-status                   # SQLite, the embedded default
    .venv/bin/python bench/status_bench.py --database-url postgresql+psycopg://postgres@127.0.0.1/bench
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import quote

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn
from rich.table import Table
from sqlalchemy import create_engine, text

from vodpush.config import Settings
from vodpush.crypto import generate_key
from vodpush.protocol.signing import sign_request
from vodpush.service import Service

HERE = Path(__file__).resolve().parent
console = Console()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fill(service: Service, *, accounts: int, rows: int) -> list[dict]:
    """Create the accounts (real, with encrypted secrets) and bulk-load the requests."""
    creds = [service.accounts.create(cdn=1000 + i, username=f"user{i}") for i in range(accounts)]
    start = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=30)
    chunk = 20_000
    columns = (
        "account_id, cdn_id, path, destination_path, bucket, acl, metadata_json, callback, "
        "signature, state, message, results_json, http_status, created_at, updated_at, "
        "attempts, not_before, bytes_done, bytes_total"
    )
    placeholders = ", ".join(["%s" if service.engine.dialect.name == "postgresql" else "?"] * 19)
    sql = f"INSERT INTO upload_requests ({columns}) VALUES ({placeholders})"
    results = (
        '{"Bucket": "bucket", "ETag": "\\"d41d8cd98f00b204e9800998ecf8427e\\"", '
        '"Key": "k", "ServerSideEncryption": "AES256"}'
    )
    rng = random.Random(1)
    with (
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress,
        service.engine.raw_connection() as raw,
    ):
        task = progress.add_task("loading requests", total=rows)
        cursor = raw.cursor()
        for base in range(0, rows, chunk):
            batch = []
            for n in range(base, min(base + chunk, rows)):
                account = creds[rng.randrange(accounts)]
                when = start + timedelta(seconds=n * 2)
                done = n % 10 != 0
                batch.append(
                    (
                        account["id"],
                        account["cdn"],
                        f"sestore1/{account['username']}/videos/{n}.mp4",
                        f"shows/{n // 1000}/{n}.mp4",
                        "bucket",
                        "private" if n % 2 else "public-read",
                        f'{{"title": "episode {n}"}}',
                        "",
                        f"sig{n}",
                        "succeeded" if done else "queued",
                        "Successfully Uploaded to AWS" if done else "Queued",
                        results if done else None,
                        200 if done else 0,
                        when,
                        when,
                        1 if done else 0,
                        when,
                        1048576 if done else 0,
                        1048576,
                    )
                )
            cursor.executemany(sql, batch)
            raw.commit()
            progress.advance(task, len(batch))
    if service.engine.dialect.name == "postgresql":
        with service.engine.connect() as conn:
            conn.execute(text("ANALYZE upload_requests"))
            conn.commit()
    return creds


def wrk_script(path: Path, bodies: list[str]) -> None:
    lines = ["local bodies = {"]
    lines += ["  [[" + body + "]]," for body in bodies]
    lines += [
        "}",
        "local i = 0",
        'wrk.method = "POST"',
        'wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"',
        "request = function()",
        "  i = i % #bodies + 1",
        "  return wrk.format(nil, nil, nil, bodies[i])",
        "end",
    ]
    path.write_text("\n".join(lines) + "\n")


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def run_wrk(url: str, script: Path, *, connections: int, duration: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t1",
            f"-c{connections}",
            f"-d{duration}s",
            "--latency",
            "-s",
            str(script),
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))}
    for pct in ("50", "99"):
        value, unit = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out).groups()
        result[f"p{pct}"] = float(value) * _UNITS[unit]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        raise RuntimeError(f"{url}: {errors.group(1)} failed responses\n{out}")
    return result


def wait_ready(url: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.post(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not start")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        console.print("[red]wrk is needed: apt-get install wrk[/red]")
        return 1

    work = Path(tempfile.mkdtemp(prefix="vodpush-bench-"))
    url = args.database_url or f"sqlite:///{work / 'bench.db'}"
    if url.startswith("postgresql"):
        engine = create_engine(url)
        with engine.connect() as conn:
            conn.execute(text("DROP TABLE IF EXISTS upload_requests, accounts, alembic_version"))
            conn.commit()
        engine.dispose()
    key = generate_key()
    settings = Settings(database_url=url, secret_key=key, sestore_root=work)
    service = Service.open(settings)
    t0 = time.monotonic()
    creds = fill(service, accounts=args.accounts, rows=args.rows)
    console.print(
        f"loaded {args.rows:,} requests for {args.accounts} accounts in "
        f"{time.monotonic() - t0:.1f} s ({url.split(':')[0]})"
    )
    service.close()

    # One pre-signed aws.status per account (default limit 25, newest first).
    now = int(time.time())
    bodies = [
        "json="
        + quote(
            sign_request(
                {
                    "command": "aws.status",
                    "api_key": c["api_key"],
                    "timestamp": now,
                    "cdn": c["cdn"],
                    "limit": 25,
                    "offset": 0,
                },
                c["api_secret"],
            ),
            safe="",
        )
        for c in creds
    ]
    script = work / "status.lua"
    wrk_script(script, bodies)

    vod_port, bare_port = free_port(), free_port()
    env = {
        **os.environ,
        "VODPUSH_DATABASE_URL": url,
        "VODPUSH_SECRET_KEY": key,
        "VODPUSH_SESTORE_ROOT": str(work),
        "VODPUSH_LOG_LEVEL": "warning",
        # wrk sends as fast as it can from one address: measure the service, not its limits.
        "VODPUSH_RATE_LIMIT": "0",
    }
    vodpush_cmd = [sys.executable, "-m", "vodpush", "serve", "--port", str(vod_port)]
    if (
        "--no-worker"
        in subprocess.run(
            [*vodpush_cmd[:3], "serve", "--help"], capture_output=True, text=True, env=env
        ).stdout
    ):
        vodpush_cmd.append("--no-worker")  # measure the API alone
    servers = {
        "vodpush": subprocess.Popen(vodpush_cmd, env=env),
        "bare": subprocess.Popen([sys.executable, str(HERE / "bare_app.py"), str(bare_port)]),
    }
    urls = {
        "vodpush": f"http://127.0.0.1:{vod_port}/stable/",
        "bare": f"http://127.0.0.1:{bare_port}/stable/",
    }
    try:
        for u in urls.values():
            wait_ready(u)
        check = httpx.post(
            urls["vodpush"],
            content=bodies[0],
            headers={"content-type": "application/x-www-form-urlencoded"},
        ).json()
        assert check["status"] == "success" and len(check["data"]) == 25, check
        results: dict[str, dict[str, dict[str, float]]] = {}
        for name, u in urls.items():
            run_wrk(u, script, connections=4, duration=2)  # warm up
            results[name] = {
                "c1": run_wrk(u, script, connections=1, duration=args.duration),
                "cN": run_wrk(u, script, connections=args.connections, duration=args.duration),
            }
    finally:
        for proc in servers.values():
            proc.send_signal(signal.SIGTERM)
        for proc in servers.values():
            proc.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    table = Table(
        title=f"aws.status, {args.rows:,} rows, {args.accounts} accounts, {url.split(':')[0]}"
    )
    table.add_column("server")
    for col in (
        "p50 c=1",
        "p99 c=1",
        f"p50 c={args.connections}",
        f"p99 c={args.connections}",
        "req/s",
    ):
        table.add_column(col, justify="right")
    for name, r in results.items():
        table.add_row(
            name,
            f"{r['c1']['p50']:.2f} ms",
            f"{r['c1']['p99']:.2f} ms",
            f"{r['cN']['p50']:.2f} ms",
            f"{r['cN']['p99']:.2f} ms",
            f"{r['cN']['rps']:,.0f}",
        )
    console.print(table)
    ratio = results["vodpush"]["cN"]["rps"] / results["bare"]["cN"]["rps"]
    console.print(f"throughput ratio vodpush/bare: {ratio:.2f} (target >= 0.50)")
    console.print(
        f"vodpush p99 at c=1: {results['vodpush']['c1']['p99']:.2f} ms, "
        f"at c={args.connections}: {results['vodpush']['cN']['p99']:.2f} ms "
        "(target < 20 ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
