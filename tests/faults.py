"""What the fault tests share: a `vodpush worker` process of their own (its environment, its
JSON log), a file queued for upload, the request's row and stored parts as the database
holds them, and waiting for a condition."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from vodpush.core.requests import NewRequest
from vodpush.persistence.models import UploadPart, UploadRequest
from vodpush.service import Service

MiB = 1024 * 1024


def worker_env(service: Service, **extra: str) -> dict[str, str]:
    """The environment of a worker process on ``service``'s database, key and sestore, with
    the test's short settings (5 s leases, 5 MiB parts one at a time, quick retries)."""
    s = service.settings
    env = {
        **os.environ,
        "VODPUSH_DATABASE_URL": s.database_url,
        "VODPUSH_SECRET_KEY": s.secret_key.get_secret_value(),
        "VODPUSH_SESTORE_ROOT": str(s.sestore_root),
        "VODPUSH_POLL_INTERVAL": "0.1",
        "VODPUSH_LEASE_SECONDS": "5",
        "VODPUSH_MULTIPART_THRESHOLD": str(5 * MiB),
        "VODPUSH_MULTIPART_CHUNKSIZE": str(5 * MiB),
        "VODPUSH_PART_CONCURRENCY": "1",
        "VODPUSH_RETRY_BASE_DELAY": "0.2",
        "VODPUSH_RETRY_WINDOW": "0",
        "VODPUSH_LOG_LEVEL": "info",
    }
    env.update(extra)
    return env


def start_worker(env: dict[str, str], log: Path, *args: str) -> subprocess.Popen:
    """`python -m vodpush worker ARGS`, its log (JSON lines on stderr) written to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "vodpush", "worker", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("wb"),
    )


def log_events(log: Path, action: str) -> list[dict]:
    """The JSON log lines of ``log`` whose action is ``action``."""
    events = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("action") == action:
            events.append(entry)
    return events


def queue_file(
    service: Service, account: Any, root: Path, name: str, size: int, bucket: str, callback=""
) -> tuple[int, bytes]:
    """``size`` random bytes written to sestore1/<username>/``name`` and queued for upload
    to ``bucket`` under the key ``name``: (request id, the bytes)."""
    path = root / "sestore1" / account.username / name
    path.parent.mkdir(parents=True, exist_ok=True)
    data = os.urandom(size)
    path.write_bytes(data)
    queued = service.requests.enqueue(
        NewRequest(
            account_id=account.id,
            cdn_id=account.cdn,
            path=f"sestore1/{account.username}/{name}",
            destination_path=name,
            bucket=bucket,
            acl="private",
            metadata={},
            callback=callback,
            signature=f"test-{name}-{time.time()}",
        )
    )
    return queued.id, data


def parts_stored(service: Service, request_id: int) -> int:
    with service.engine.connect() as conn:
        return conn.execute(
            select(func.count()).where(UploadPart.request_id == request_id)
        ).scalar_one()


def request_row(service: Service, request_id: int) -> Any:
    with service.engine.connect() as conn:
        return conn.execute(
            select(UploadRequest.__table__).where(UploadRequest.id == request_id)
        ).first()


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
