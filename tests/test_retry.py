"""Retries outlast outages (issue 9, item 3): the upload backoff schedule and its settings,
due times on the store's clock (never a worker's), and what a request waiting for its
next attempt shows over HTTP, in both CLIs and in the metrics.

The S3 outage itself (32 uploads through a TCP proxy that goes down) and a request that
kills every worker are in tests/test_faults.py."""

from __future__ import annotations

import json
import random
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.conftest import free_port, run_cli
from tests.test_store_contract import _worker_clock_ahead
from tests.wire import call
from vodpush.config import Settings
from vodpush.core import records
from vodpush.core.accounts import S3Settings
from vodpush.core.clock import utcnow
from vodpush.core.requests import NewRequest
from vodpush.core.retry import backoff_ceiling, shortest_retry_span
from vodpush.crypto import generate_key
from vodpush.service import Service
from vodpush.transfer import UploadError, UploadResult
from vodpush.worker.retry import decide
from vodpush.worker.runner import Worker

DEFAULTS = {name: Settings.model_fields[name].default for name in Settings.model_fields}


class _Edge:
    """An rng whose every draw is the lowest (or the highest) the policy allows."""

    def __init__(self, high: bool) -> None:
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


def _schedule(*, max_attempts: int, base: float, cap: float, rng: Any) -> list[float]:
    """The waits of an upload that fails every attempt with a transient error, as the
    worker's policy draws them."""
    waits = []
    for made in range(1, max_attempts + 10):
        decision = decide(
            transient=True,
            attempts_made=made,
            max_attempts=max_attempts,
            base_delay=base,
            max_delay=cap,
            rng=rng,
        )
        if not decision.retry:
            break
        assert decision.delay is not None
        waits.append(decision.delay)
    return waits


# -- the schedule (pure) -------------------------------------------------------------------


def test_the_default_schedule_retries_for_at_least_an_hour() -> None:
    """Even when every jitter draw is the lowest, an upload failing on transient errors is
    retried for over an hour (the old defaults: at most 30 s), and the longest draws end
    it within about two hours."""
    shape = {
        "max_attempts": DEFAULTS["max_attempts"],
        "base": DEFAULTS["retry_base_delay"],
        "cap": DEFAULTS["retry_max_delay"],
    }
    shortest = _schedule(**shape, rng=_Edge(high=False))
    longest = _schedule(**shape, rng=_Edge(high=True))
    assert len(shortest) == DEFAULTS["max_attempts"] - 1  # attempts, not retries
    assert sum(shortest) >= 3600
    assert DEFAULTS["retry_window"] == 3600
    assert sum(shortest) == pytest.approx(shortest_retry_span(**shape))
    assert sum(longest) <= 2.5 * 3600
    assert max(longest) == DEFAULTS["retry_max_delay"] == 900
    assert shortest[0] >= DEFAULTS["retry_base_delay"] / 2  # a first retry within seconds
    # The old defaults (5 attempts, 2 s doubling to 300 s) gave up within half a minute.
    assert sum(_schedule(max_attempts=5, base=2, cap=300, rng=_Edge(high=True))) == 30


@settings(max_examples=300, deadline=None)
@given(
    base=st.floats(min_value=0.001, max_value=600),
    cap=st.floats(min_value=0.001, max_value=86_400),
    max_attempts=st.integers(min_value=1, max_value=60),
    seed=st.integers(min_value=0, max_value=2**32),
)
def test_waits_never_pass_the_cap_and_grow(
    base: float, cap: float, max_attempts: int, seed: int
) -> None:
    waits = _schedule(max_attempts=max_attempts, base=base, cap=cap, rng=random.Random(seed))
    assert len(waits) == max_attempts - 1
    for retry, wait in enumerate(waits, start=1):
        ceiling = backoff_ceiling(retry, base, cap)
        assert ceiling / 2 <= wait <= ceiling <= cap
        if retry > 1:
            previous = backoff_ceiling(retry - 1, base, cap)
            assert ceiling >= previous  # the backoff never shrinks
            if ceiling == 2 * previous:  # below the cap, whatever the draws: each wait is
                assert wait >= waits[retry - 2]  # at least the longest the last could be
    assert sum(waits) >= shortest_retry_span(max_attempts, base, cap) * (1 - 1e-9)


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(min_value=0.01, max_value=120),
    cap=st.floats(min_value=0.01, max_value=3600),
    max_attempts=st.integers(min_value=1, max_value=40),
    window=st.floats(min_value=0, max_value=20_000),
)
def test_settings_are_refused_when_the_shortest_schedule_misses_the_window(
    base: float, cap: float, max_attempts: int, window: float
) -> None:
    shortest = sum(_schedule(max_attempts=max_attempts, base=base, cap=cap, rng=_Edge(False)))
    values = {
        "max_attempts": max_attempts,
        "retry_base_delay": base,
        "retry_max_delay": cap,
        "retry_window": window,
    }
    if shortest >= window * (1 + 1e-9):
        Settings(**values)
    elif shortest < window * (1 - 1e-9):
        with pytest.raises(ValidationError, match="retry_window"):
            Settings(**values)


def test_the_refusal_says_what_would_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VODPUSH_MAX_ATTEMPTS", "5")  # the old default
    with pytest.raises(ValidationError) as refused:
        Settings()
    text = str(refused.value)
    assert "retries a failing upload for at least 38 s" in text
    assert "less than retry_window=3600 s: set max_attempts to 16 or more" in text
    monkeypatch.setenv("VODPUSH_RETRY_WINDOW", "0")  # an operator who wants quick failures
    assert Settings().max_attempts == 5
    monkeypatch.setenv("VODPUSH_RETRY_WINDOW", "600")
    monkeypatch.setenv("VODPUSH_MAX_ATTEMPTS", "15")
    monkeypatch.setenv("VODPUSH_RETRY_MAX_DELAY", "120")
    assert Settings().retry_window == 600  # 2.5+5+10+20+40 + 9 x 60 = 617.5 s at the least


def test_permanent_errors_and_spent_attempts_are_not_retried() -> None:
    common = {"max_attempts": 3, "base_delay": 1.0, "max_delay": 10.0}
    assert not decide(transient=False, attempts_made=1, **common).retry
    assert decide(transient=True, attempts_made=2, **common).retry
    assert not decide(transient=True, attempts_made=3, **common).retry


# -- the runner puts no time of its own on a retry -----------------------------------------


def _transient_then_ok() -> Callable[..., UploadResult]:
    calls: list[int] = []

    def upload(client: Any, job: Any, ledger: Any, **kw: Any) -> UploadResult:
        calls.append(1)
        if len(calls) == 1:
            raise UploadError("S3 said SlowDown", transient=True, http_status=503, code="SlowDown")
        return UploadResult(
            results={"ETag": '"e"'}, http_status=200, sha256="ab" * 32, size=1,
            parts_sent=1, parts_total=1,
        )  # fmt: skip

    return upload


def _queue_one(service: Service) -> int:
    account = int(service.accounts.create(cdn=1, username="jb")["id"])
    service.accounts.allow_buckets(str(account), ["b"])
    new = NewRequest(account, 1, "sestore1/jb/a.mp4", "a.mp4", "b", "private", {}, "", "sig")
    return service.requests.enqueue(new).id


def _until_retrying(service: Service, worker: Worker, request_id: int, timeout: float) -> Any:
    """Run ``worker`` until the request waits for a retry; its row then."""
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            row = service.requests.get(request_id)
            if row is not None and row.state == "retrying":
                return row
            time.sleep(0.02)
        pytest.fail(f"request {request_id} never waited for a retry")
    finally:
        worker.stop(grace=0)
        thread.join(10)


def _quick_settings(tmp_path: Path, **values: Any) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'unused.db'}",
        sestore_root=tmp_path,
        secret_key=generate_key(),
        secret_key_file=tmp_path / "unused.key",
        poll_interval=0.02,
        **values,
    )


def test_a_retry_is_due_by_the_stores_clock_and_says_when(tmp_path: Path) -> None:
    """The worker hands the store a delay; the store (here in memory, its clock set years
    from the real one) makes it a time and writes it into the message."""
    store_now = datetime(2031, 6, 1, 12, 0, 0)
    settings = _quick_settings(
        tmp_path, max_attempts=4, retry_base_delay=20, retry_max_delay=20, retry_window=0
    )
    service = Service.in_memory(settings, clock=lambda: store_now)
    request_id = _queue_one(service)
    worker = Worker(service, uploader=_transient_then_ok())
    row = _until_retrying(service, worker, request_id, timeout=20)
    entry = records.render(row)
    at = datetime.fromisoformat(entry["next_attempt_at"])
    assert store_now + timedelta(seconds=10) <= at <= store_now + timedelta(seconds=20)
    assert entry["message"] == (
        f"Retrying at {entry['next_attempt_at']} UTC (attempt 2 of 4): S3 said SlowDown"
    )
    assert (entry["state"], entry["error_code"], entry["status"]) == ("retrying", "SlowDown", 503)


def test_a_worker_clock_15_s_ahead_changes_nothing(
    service: Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On SQLite and PostgreSQL, with the clock of the API and the worker (this process)
    15 s ahead of the database's: a new request is taken at once and its retry is due
    after the drawn delay by the database's clock, not 15 s later."""
    service.settings.retry_base_delay = service.settings.retry_max_delay = 20
    _worker_clock_ahead(monkeypatch, 15)
    before = utcnow()  # this module's utcnow tells the truth
    request_id = _queue_one(service)
    worker = Worker(service, uploader=_transient_then_ok())
    row = _until_retrying(service, worker, request_id, timeout=10)  # not 15 s late
    at = datetime.fromisoformat(records.render(row)["next_attempt_at"])
    after = utcnow()
    assert before + timedelta(seconds=9) <= at <= after + timedelta(seconds=21)
    created = datetime.fromisoformat(records.render(row)["created"])
    assert before - timedelta(seconds=1) <= created <= after


# -- what people see while a request waits for its retry -----------------------------------


def test_a_request_waiting_for_a_retry_shows_when_and_why(
    live_server, service, account, sestore_root, cli_env, capsys, monkeypatch
) -> None:
    """S3 is unreachable (nothing listens on its port): after the first attempt, aws.status
    over HTTP, `vodpush client status`, `vodpush request list` and /metrics show the
    request retrying, when, and the last error; `vodpush client wait` prints the retry
    line, then the failure."""
    monkeypatch.setenv("COLUMNS", "250")  # rich folds long cells on narrow terminals
    dead = f"http://127.0.0.1:{free_port()}"
    service.accounts.set_s3(
        account.api_key,
        S3Settings(endpoint_url=dead, region="us-east-1", access_key_id="k", secret_access_key="s"),
    )
    # Two attempts, the second 3 to 6 s after the first.
    service.settings.max_attempts = 2
    service.settings.retry_base_delay = service.settings.retry_max_delay = 6
    (sestore_root / "sestore1" / account.username / "show.mp4").write_bytes(b"v" * 1000)
    answer = call(
        live_server.url, account, "aws.upload", path=f"sestore1/{account.username}/show.mp4",
        destination_path="shows/show.mp4", bucket="vod-bucket", acl="private",
    )  # fmt: skip
    assert answer["status"] == "success", answer
    request_id = answer["data"]["id"]

    def status() -> dict[str, Any]:
        answer = call(live_server.url, account, "aws.status", id=request_id)
        assert answer["status"] == "success", answer
        return answer["data"][0]

    worker = Worker(service)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while (entry := status())["state"] != "retrying":
            assert time.monotonic() < deadline, entry
            time.sleep(0.05)
    finally:
        worker.stop(grace=0)  # no worker: it stays retrying while we look
        thread.join(10)

    when = entry["next_attempt_at"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", when)
    assert when > entry["last_updated"] >= entry["created"]
    cause = "S3 connection error: could not connect to the S3 endpoint"
    assert entry["message"] == f"Retrying at {when} UTC (attempt 2 of 2): {cause}"
    assert (entry["state"], entry["error_code"], entry["attempts"], entry["status"]) == (
        "retrying", "EndpointConnectionError", 1, 0
    )  # fmt: skip
    assert dead not in entry["message"]  # the operator's endpoint is not the customer's

    metrics = httpx.get(live_server.url + "/metrics", timeout=10).text
    assert 'vodpush_queue_depth{state="retrying"} 1.0' in metrics

    client = ["--url", live_server.url, "--cdn", str(account.cdn), "--api-key", account.api_key]
    client += ["--api-secret", account.api_secret]
    code, out, err = run_cli(capsys, "client", "status", "--id", str(request_id), *client)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if "retrying" in line]
    assert "next attempt (UTC)" in out and row.count(when) == 2  # its column, its message
    code, out, err = run_cli(capsys, "client", "status", "--json", *client)
    assert code == 0, err
    assert json.loads(out)[0]["next_attempt_at"] == when

    code, out, err = run_cli(capsys, "request", "list", account.api_key)
    assert code == 0, err
    (row,) = [line for line in out.splitlines() if "retrying" in line]
    assert "next attempt (UTC)" in out and row.count(when) == 2
    assert cause in row

    # `wait` sees it retrying first; then (its first poll answered) a worker takes it again
    # when due, and `wait` follows it to the end.
    polled = threading.Event()
    list_for_account = service.requests.list_for_account

    def observed(*args: Any, **kwargs: Any) -> Any:
        rows = list_for_account(*args, **kwargs)
        polled.set()
        return rows

    monkeypatch.setattr(service.requests, "list_for_account", observed)
    worker = Worker(service)

    def work_after_first_poll() -> None:
        if polled.wait(30):
            worker.run(burst=True)

    thread = threading.Thread(target=work_after_first_poll, daemon=True)
    thread.start()
    try:
        code, out, err = run_cli(
            capsys, "client", "wait", str(request_id), "--interval", "0.2", *client
        )
    finally:
        worker.stop(grace=0)
        thread.join(30)
    assert code == 1, err
    lines = [line.split(": ", 1)[1] for line in err.splitlines()]
    assert lines[0] == entry["message"]
    assert lines[-1] == f"Upload failed: {cause}"
    assert out == f"request {request_id} failed: {lines[-1]}\n"
