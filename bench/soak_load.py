"""The soak's load: signed aws.upload and aws.status calls from every account, arriving at a
steady rate (Poisson arrivals from a seeded generator), sent by the Python client
(vodpush_client, which signs as the PHP reference client does and resends an upload's
same signed body when an answer is lost). Each call is timed from the moment it was due, so
a slow API shows in the latency even when every sender thread is busy waiting on it.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TypeVar

from vodpush_client import ApiError, Client, StatusRecord, TransportError

UPLOAD = "aws.upload"
STATUS_LIST = "aws.status (page)"
STATUS_ID = "aws.status (id)"
COMMANDS = (UPLOAD, STATUS_LIST, STATUS_ID)

T = TypeVar("T")


@dataclass(frozen=True)
class Account:
    index: int
    username: str
    cdn: int
    api_key: str
    api_secret: str
    bucket: str
    files: tuple[str, ...]  # small files, as API paths (sestore1/<username>/...)
    big: str  # a file above the multipart threshold
    api_url: str


@dataclass
class Upload:
    """One aws.upload call: ``key`` (its destination_path) is unique to it."""

    key: str
    acl: str
    bucket: str
    username: str
    callback_key: str | None
    request_id: int | None = None
    error: str | None = None


class Load:
    def __init__(
        self,
        accounts: list[Account],
        callback_url: Callable[[str, str], str],  # (username, key) -> URL
        *,
        seed: int,
        upload_rate: float,
        status_rate: float,
        callback_fraction: float,
        big_fraction: float,
        threads: int = 64,
    ) -> None:
        if upload_rate <= 0 or status_rate < 0:
            raise ValueError("upload_rate must be > 0 and status_rate >= 0")
        self._accounts = accounts
        self._callback_url = callback_url
        self._random = random.Random(seed)
        self._upload_rate = upload_rate
        self._status_rate = status_rate
        self._callback_fraction = callback_fraction
        self._big_fraction = big_fraction
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="load")
        self._clients = {
            a.index: Client(a.api_url, a.cdn, a.api_key, a.api_secret, timeout=10.0)
            for a in accounts
        }
        self._lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.errors: Counter[tuple[str, str]] = Counter()
        self.uploads: dict[str, Upload] = {}
        self.foreign_records = 0  # aws.status records of another account (must stay 0)
        self._ids: dict[int, list[int]] = defaultdict(list)  # account index -> request ids

    # -- scheduling ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Send calls until ``stop`` is set."""
        rate = self._upload_rate + self._status_rate
        due = time.monotonic()
        seq = 0
        while True:
            due += self._random.expovariate(rate)
            delay = due - time.monotonic()
            if stop.wait(max(delay, 0)):
                return
            account = self._random.choice(self._accounts)
            if self._random.random() < self._upload_rate / rate:
                seq += 1
                upload, path, metadata = self._plan_upload(account, seq)
                self._pool.submit(self._upload, account, upload, path, metadata, due)
            elif self._random.random() < 0.7:
                limit = self._random.choice((10, 25, 100))
                self._pool.submit(self._status_page, account, limit, due)
            else:
                self._pool.submit(self._status_id, account, due)

    def _plan_upload(self, account: Account, seq: int) -> tuple[Upload, str, dict[str, str]]:
        path = account.big if self._random.random() < self._big_fraction else None
        path = path or self._random.choice(account.files)
        callback_key = f"{seq:07d}" if self._random.random() < self._callback_fraction else None
        metadata = {"soak-seq": str(seq)} if self._random.random() < 0.3 else {}
        upload = Upload(
            acl=self._random.choice(("private", "public-read")),
            key=f"soak/{seq:07d}/{PurePosixPath(path).name}",
            bucket=account.bucket,
            username=account.username,
            callback_key=callback_key,
        )
        with self._lock:
            self.uploads[upload.key] = upload
        return upload, path, metadata

    def finish(self) -> None:
        """Wait for the calls in flight (each is bounded by the client's timeouts)."""
        self._pool.shutdown(wait=True, cancel_futures=False)
        for client in self._clients.values():
            client.close()

    # -- the calls ----------------------------------------------------------------------------

    def _timed(self, command: str, due: float, call: Callable[[], T]) -> T:
        error = None
        try:
            return call()
        except ApiError as exc:
            error = f"code {exc.code}"
        except TransportError as exc:
            error = f"HTTP {exc.status_code}" if exc.status_code else "no answer"
        except Exception as exc:  # a bench records, it does not stop on one odd call
            error = type(exc).__name__
        finally:
            with self._lock:
                self.latencies[command].append(time.monotonic() - due)
                if error is not None:
                    self.errors[(command, error)] += 1
        raise _Failed(error)

    def _upload(
        self, account: Account, upload: Upload, path: str, metadata: dict[str, str], due: float
    ) -> None:
        callback = (
            self._callback_url(account.username, upload.callback_key) if upload.callback_key else ""
        )
        client = self._clients[account.index]
        try:
            request_id = self._timed(
                UPLOAD,
                due,
                lambda: client.upload(
                    path, upload.key, upload.bucket, upload.acl, metadata, callback
                ),
            )
        except _Failed as failed:
            upload.error = str(failed)
            return
        upload.request_id = request_id
        with self._lock:
            self._ids[account.index].append(request_id)

    def _status_page(self, account: Account, limit: int, due: float) -> None:
        client = self._clients[account.index]
        try:
            records = self._timed(STATUS_LIST, due, lambda: client.status(limit=limit))
        except _Failed:
            return
        self._check_own(account, records)

    def _status_id(self, account: Account, due: float) -> None:
        with self._lock:
            ids = self._ids[account.index]
            request_id = ids[int(time.monotonic() * 1000) % len(ids)] if ids else 1
        client = self._clients[account.index]
        try:
            records = self._timed(STATUS_ID, due, lambda: client.status(limit=1, id=request_id))
        except _Failed:
            return
        self._check_own(account, records)

    def _check_own(self, account: Account, records: list[StatusRecord]) -> None:
        prefix = f"sestore1/{account.username}/"
        foreign = sum(not r.path.startswith(prefix) for r in records)
        if foreign:
            with self._lock:
                self.foreign_records += foreign


class _Failed(Exception):
    """A call that failed; its error is already counted."""
