"""Fairness between accounts and the per-account limit of uploads in flight, as customers
and the operator see them: uploads queued over HTTP against a live server, a worker
uploading to the moto S3 server, aws.status; the operator CLI; and on PostgreSQL several
workers (engines of their own) claiming at once."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import Creds, MiB, run_cli
from tests.test_worker import Receiver
from tests.wire import call
from vodpush.config import Settings
from vodpush.core.requests import NewRequest
from vodpush.crypto import generate_key
from vodpush.service import Service
from vodpush.worker.runner import Worker


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # One client queues a hundred uploads at once for one account: no rate limit here.
    settings.rate_limit = 0
    return settings


def _s3_user(service: Service, make_account: Any, s3: Any, username: str, cdn: int) -> Creds:
    creds = make_account(cdn=cdn, username=username)
    service.accounts.set_s3(creds.api_key, s3.settings())
    return creds


def _queue(
    url: str, creds: Creds, bucket: str, path: str, count: int, callback: str = ""
) -> list[int]:
    ids = []
    for n in range(count):
        answer = call(
            url, creds, "aws.upload", path=path, destination_path=f"{creds.username}/{n}.mp4",
            bucket=bucket, acl="private", callback=callback,
        )  # fmt: skip
        assert answer["status"] == "success", answer
        ids.append(answer["data"]["id"])
    return ids


def _states(url: str, creds: Creds, limit: int = 1000) -> dict[int, str]:
    answer = call(url, creds, "aws.status", limit=limit)
    assert answer["status"] == "success", answer
    return {entry["id"]: entry["state"] for entry in answer["data"]}


class _Running:
    """A worker of this process in a thread of its own, until the block ends."""

    def __init__(self, service: Service, concurrency: int) -> None:
        self.worker = Worker(service, concurrency=concurrency)
        self._thread = threading.Thread(target=self.worker.run, daemon=True)

    def __enter__(self) -> Worker:
        self._thread.start()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.worker.stop(grace=0)
        self._thread.join(30)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def test_a_single_upload_is_not_served_after_another_accounts_hundred(
    live_server, service, make_account, s3, bucket, sestore_root, receiver
) -> None:
    """The issue's case: one customer queues 100 uploads, another one upload after them.
    The second customer's upload finishes among the first few, not after the hundred: its
    callback (sent when an upload ends) is among the first few a real receiver gets."""
    big = _s3_user(service, make_account, s3, "big", 158)
    small = _s3_user(service, make_account, s3, "small", 159)
    for creds in (big, small):
        (sestore_root / "sestore1" / creds.username / "clip.mp4").write_bytes(os.urandom(2000))
    hook = receiver.url
    backlog = _queue(live_server.url, big, bucket, "sestore1/big/clip.mp4", 100, callback=hook)
    (late,) = _queue(live_server.url, small, bucket, "sestore1/small/clip.mp4", 1, callback=hook)
    assert late > max(backlog)  # queued last

    with _Running(service, concurrency=service.settings.worker_concurrency):
        deadline = time.monotonic() + 90
        while len(receiver.received) < 101:
            assert time.monotonic() < deadline, f"{len(receiver.received)} of 101 callbacks"
            time.sleep(0.05)
    finished = [json.loads(body)["id"] for _headers, body in receiver.received]
    assert sorted(finished) == sorted([*backlog, late])
    assert set(_states(live_server.url, big).values()) == {"succeeded"}
    assert _states(live_server.url, small) == {late: "succeeded"}
    # Fewest uploads in flight first: it is claimed second, beside the first few of the
    # hundred; unfair, it would have been the last.
    assert finished.index(late) < 5, f"finished after {finished.index(late)} of the hundred"


def test_the_in_flight_limit_holds_with_more_worker_threads_than_it(
    live_server, service, make_account, s3, bucket, sestore_root, cli_env, capsys
) -> None:
    """The operator limits one account to 2 uploads at once; the worker runs 6. The
    account's uploads never run more than 2 at a time, and the other account's uploads
    use the worker's other threads meanwhile."""
    limited = _s3_user(service, make_account, s3, "limited", 158)
    other = _s3_user(service, make_account, s3, "other", 159)
    code, out, err = run_cli(capsys, "account", "set-limit", "158/limited", "--max-in-flight", "2")
    assert code == 0, err
    assert json.loads(out)["max_in_flight"] == 2
    # Two parts each (multipart from 5 MiB): long enough for uploads to overlap.
    data = os.urandom(6 * MiB)
    for creds in (limited, other):
        (sestore_root / "sestore1" / creds.username / "big.mp4").write_bytes(data)
    mine = _queue(live_server.url, limited, bucket, "sestore1/limited/big.mp4", 6)
    theirs = _queue(live_server.url, other, bucket, "sestore1/other/big.mp4", 4)

    most = {"limited": 0, "all": 0}
    watching = threading.Event()

    def watch() -> None:  # the stores' own view, polled far faster than HTTP allows
        while not watching.is_set():
            running = {
                account.username: sum(
                    row.state == "running"
                    for row in service.requests.list_for_account(account.id, limit=100, offset=0)
                )
                for account in (limited, other)
            }
            most["limited"] = max(most["limited"], running["limited"])
            most["all"] = max(most["all"], running["limited"] + running["other"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        with _Running(service, concurrency=6):
            deadline = time.monotonic() + 120
            for creds, ids in ((limited, mine), (other, theirs)):
                while set(_states(live_server.url, creds).values()) != {"succeeded"}:
                    assert time.monotonic() < deadline, "the uploads did not finish"
                    time.sleep(0.1)
                assert sorted(_states(live_server.url, creds)) == ids
    finally:
        watching.set()
        watcher.join(10)
    assert most["limited"] == 2  # the limit was reached, never passed
    assert most["all"] > 2  # the worker's other threads served the other account meanwhile


def test_the_operator_sets_shows_and_removes_a_limit(
    service, account, cli_env, capsys, monkeypatch
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich folds the table on a narrow terminal
    ref = f"{account.cdn}/{account.username}"
    code, out, err = run_cli(capsys, "account", "show", ref)
    assert code == 0, err
    shown = json.loads(out)
    assert shown["max_in_flight"] is None and shown["username"] == account.username
    assert account.api_secret not in out
    code, out, err = run_cli(capsys, "account", "set-limit", ref, "--max-in-flight", "3")
    assert code == 0, err
    assert json.loads(out)["max_in_flight"] == 3
    assert service.accounts.find(ref).max_in_flight == 3
    code, out, _ = run_cli(capsys, "account", "show", account.api_key)
    assert json.loads(out)["max_in_flight"] == 3
    code, out, _ = run_cli(capsys, "account", "list")
    assert code == 0 and "max in flight" in out
    code, out, err = run_cli(capsys, "account", "set-limit", ref, "--no-limit")
    assert code == 0, err
    assert json.loads(out)["max_in_flight"] is None
    assert service.accounts.find(ref).max_in_flight is None
    # Refusals: clear, and nothing changes.
    for argv, says in (
        ([ref], "give --max-in-flight N or --no-limit"),
        ([ref, "--max-in-flight", "2", "--no-limit"], "give --max-in-flight N or --no-limit"),
        ([ref, "--max-in-flight", "0"], "0 is not in the range x>=1"),
        (["158/nobody", "--max-in-flight", "2"], "no such account"),
    ):
        code, out, err = run_cli(capsys, "account", "set-limit", *argv)
        assert code != 0 and says in err, (argv, err)
    assert service.accounts.find(ref).max_in_flight is None


# -- PostgreSQL: several workers claiming at once -------------------------------------------


@pytest.fixture
def pg_services(pg_url: str, tmp_path: Path) -> Iterator[list[Service]]:
    """Four services on one PostgreSQL database: four worker processes' engines."""
    key = generate_key()
    services = [
        Service.open(
            Settings(
                database_url=pg_url,
                sestore_root=tmp_path,
                secret_key=key,
                secret_key_file=tmp_path / "unused.key",
            )
        )
        for _ in range(4)
    ]
    yield services
    for service in services:
        service.close()


@pytest.mark.postgres
def test_concurrent_claimers_on_postgresql_keep_every_limit(
    pg_services: list[Service], pg_url: str
) -> None:
    """Eight claimers on four engines claim, hold for a moment and finish, until the queue
    is empty; a watcher counts each account's running requests all along. No request is
    handed out twice, none is lost, and no account ever has more running than its limit."""
    first = pg_services[0]
    limits = {"two": 2, "one": 1, "free": None}
    accounts = {}
    for n, (name, limit) in enumerate(limits.items()):
        accounts[name] = int(first.accounts.create(cdn=100 + n, username=name)["id"])
        first.accounts.set_max_in_flight(f"{100 + n}/{name}", limit)
    queued = {
        name: [
            first.requests.enqueue(
                NewRequest(
                    account,
                    1,
                    f"sestore1/{name}/x",
                    f"{i}",
                    "b",
                    "private",
                    {},
                    "",
                    f"sig-{name}-{i}",
                )
            ).id
            for i in range(30)
        ]
        for name, account in accounts.items()
    }
    claimed: list[int] = []
    most: dict[int, int] = {}
    lock, done, errors = threading.Lock(), threading.Event(), []
    total = sum(len(ids) for ids in queued.values())

    def claimer(service: Service, owner: str, seed: int) -> None:
        rng = random.Random(seed)
        try:
            while not done.is_set():
                request = service.queue.claim(owner, 30)
                if request is None:
                    time.sleep(0.001)  # the limits hold the rest back for now
                    continue
                with lock:
                    claimed.append(request.id)
                    if len(claimed) == total:
                        done.set()
                time.sleep(rng.uniform(0, 0.004))
                service.queue.succeed(request.id, owner, results={}, http_status=200,
                                      sha256="0" * 64, size=1, has_callback=False)  # fmt: skip
        except Exception as exc:  # reported below, not lost in a thread
            errors.append(exc)
            done.set()

    def watcher() -> None:
        engine = create_engine(pg_url)
        by_account = text(
            "SELECT account_id, count(*) FROM upload_requests WHERE state = 'running' "
            "GROUP BY account_id"
        )
        try:
            with engine.connect() as conn:
                while not done.is_set():
                    for account, count in conn.execute(by_account):
                        most[account] = max(most.get(account, 0), count)
                    conn.rollback()
        finally:
            engine.dispose()

    threads = [threading.Thread(target=watcher)] + [
        threading.Thread(target=claimer, args=(pg_services[n % 4], f"w{n}", n)) for n in range(8)
    ]
    for thread in threads:
        thread.start()
    done.wait(120)
    done.set()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert sorted(claimed) == sorted(rid for ids in queued.values() for rid in ids)
    assert most[accounts["two"]] == 2 and most[accounts["one"]] == 1
    assert most[accounts["free"]] > 2  # the claimers did run side by side
