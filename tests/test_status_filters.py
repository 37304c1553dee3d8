"""aws.status filters, keyset paging and total, over real HTTP on SQLite and PostgreSQL:
each filter alone and together, lists of states, created_from/created_to (both inclusive,
to the second), path prefixes with LIKE's wildcards in them, every invalid value refused
naming its field, and keyset pages that neither repeat nor skip a request while new ones
arrive. The requests are queued through the store and given their states and times in the
database: what is under test is what aws.status answers."""

from __future__ import annotations

import itertools
import json
import random
import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import update

from tests.conftest import run_cli
from tests.wire import call
from vodpush.api.dispatch import is_read_only
from vodpush.cli import main
from vodpush.client import ApiError, ApiWarning, Client
from vodpush.commands import COMMAND_FIELDS
from vodpush.core.filters import prefix_upper_bound
from vodpush.core.requests import NewRequest
from vodpush.persistence.models import UploadRequest

_T = UploadRequest.__table__
_SIGNATURES = itertools.count()


def queue(service: Any, creds: Any, path: str, **columns: Any) -> int:
    """A request of ``creds``'s account (through the store), then ``columns`` set on it:
    state, bucket, created_at (None: left as queued)."""
    columns = {name: value for name, value in columns.items() if value is not None}
    request_id = service.requests.enqueue(
        NewRequest(
            account_id=creds.id,
            cdn_id=creds.cdn,
            path=path,
            destination_path="out.mp4",
            bucket=columns.pop("bucket", "my-bucket"),
            acl="private",
            metadata={},
            callback="",
            signature=f"sig-{next(_SIGNATURES)}",
        )
    ).id
    if columns:
        with service.engine.begin() as conn:
            conn.execute(update(_T).where(_T.c.id == request_id).values(**columns))
    return request_id


def status(url: str, creds: Any, **fields: Any) -> dict[str, Any]:
    answer = call(url, creds, "aws.status", **fields)
    assert answer["status"] == "success", answer
    return answer


def ids(answer: dict[str, Any]) -> list[int]:
    return [record["id"] for record in answer["data"]]


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture
def requests(service, account, make_account) -> dict[str, int]:
    """A dozen requests of the account in several states, buckets, folders and seconds,
    and another account's with the same values (never to be listed)."""
    rows = {
        "a": ("sestore1/jb/shows/a.mp4", "succeeded", "b-one", "2026-01-01 00:00:00.500000"),
        "b": ("sestore1/jb/shows/b.mp4", "failed", "b-one", "2026-01-01 00:00:01.000000"),
        "c": ("sestore1/jb/shows/c.mp4", "retrying", "b-two", "2026-01-01 00:00:01.999999"),
        "d": ("sestore1/jb/movies/d.mp4", "failed", "b-two", "2026-01-01 00:00:02.000000"),
        "e": ("sestore1/jb/movies/e.mp4", "queued", "b-one", "2026-01-02 12:00:00.000000"),
        "f": ("sestore1/jb/showsX/f.mp4", "running", "b-one", "2026-01-03 00:00:00.000000"),
        "g": ("sestore1/jb/Shows/g.mp4", "succeeded", "B-one", "2026-01-03 00:00:00.250000"),
        "h": ("sestore1/jb/shows/h.mp4", "canceled", "b-two", "2026-01-04 23:59:59.999999"),
    }
    made = {
        name: queue(service, account, path, state=state, bucket=bucket, created_at=at(when))
        for name, (path, state, bucket, when) in rows.items()
    }
    other = make_account(cdn=159, username="lb")
    for name, (path, state, bucket, when) in rows.items():
        queue(service, other, path, state=state, bucket=bucket, created_at=at(when))
    return made


def named(requests: dict[str, int], names: str) -> list[int]:
    """The ids of the requests ``names`` (one letter each), newest first."""
    return sorted((requests[n] for n in names), reverse=True)


def test_each_filter_alone_and_all_together(live_server, account, requests) -> None:
    url = live_server.url
    cases: list[tuple[dict[str, Any], str]] = [
        ({"state": "failed"}, "bd"),
        ({"state": ["failed", "retrying"]}, "bcd"),
        ({"state": ["canceled"]}, "h"),
        ({"state": ["queued", "queued", "running"]}, "ef"),
        ({"bucket": "b-one"}, "abef"),
        ({"bucket": "B-one"}, "g"),
        ({"path_prefix": "sestore1/jb/shows/"}, "abch"),
        ({"path_prefix": "sestore1/jb/shows"}, "abcfh"),
        ({"path_prefix": "sestore1/jb/Shows"}, "g"),
        ({"path_prefix": "sestore1/jb/"}, "abcdefgh"),
        ({"path_prefix": "sestore1/lb/"}, ""),
        # Both bounds inclusive, to the second: 00:00:01 takes in .000 and .999999.
        ({"created_from": "2026-01-01 00:00:01", "created_to": "2026-01-01 00:00:01"}, "bc"),
        ({"created_from": "2026-01-01 00:00:01"}, "bcdefgh"),
        ({"created_to": "2026-01-01 00:00:01"}, "abc"),
        ({"created_to": "2026-01-04 23:59:59"}, "abcdefgh"),
        ({"created_from": "2026-01-03 00:00:00", "created_to": "2026-01-03 00:00:00"}, "fg"),
        # Unix seconds, as a number or digits: 2026-01-02 00:00:00 UTC.
        ({"created_from": 1767312000}, "efgh"),
        ({"created_from": "1767312000", "created_to": 1767398399}, "e"),
        (
            {
                "state": ["failed", "succeeded", "retrying"],
                "bucket": "b-one",
                "path_prefix": "sestore1/jb/shows/",
                "created_from": "2026-01-01 00:00:00",
                "created_to": "2026-01-01 00:00:01",
            },
            "ab",
        ),
    ]
    for fields, expected in cases:
        answer = status(url, account, **fields)
        assert ids(answer) == named(requests, expected), (fields, answer)
        assert answer["total"] == len(expected), fields
        for record in answer["data"]:
            assert record["cdn_id"] == account.cdn
    # total counts every match, whatever the page.
    page = status(url, account, bucket="b-one", limit=1, offset=1)
    assert ids(page) == named(requests, "abef")[1:2] and page["total"] == 4
    # id narrows further, and is counted so.
    one = status(url, account, state="failed", id=requests["d"], limit=1)
    assert ids(one) == [requests["d"]] and one["total"] == 1
    assert status(url, account, state="failed", id=requests["a"])["data"] == []


def test_path_prefix_characters_are_plain_characters(live_server, service, account) -> None:
    paths = {
        "percent": "sestore1/jb/50%off.mp4",
        "percent-like": "sestore1/jb/50xoff.mp4",
        "underscore": "sestore1/jb/a_b.mp4",
        "underscore-like": "sestore1/jb/aXb.mp4",
        "backslash": "sestore1/jb/back\\slash.mp4",
        "backslash-like": "sestore1/jb/back/slash.mp4",
        "upper": "sestore1/jb/Case.mp4",
        "lower": "sestore1/jb/case.mp4",
        "quote": 'sestore1/jb/it\'s "quoted".mp4',
        "accent": "sestore1/jb/café.mp4",
        "decomposed": "sestore1/jb/cafe\u0301.mp4",
    }
    made = {name: queue(service, account, path) for name, path in paths.items()}

    def listed(prefix: str) -> set[str]:
        answer = status(live_server.url, account, path_prefix=prefix)
        assert answer["total"] == len(answer["data"])
        return {name for name, rid in made.items() if rid in ids(answer)}

    assert listed("sestore1/jb/50%") == {"percent"}
    assert listed("sestore1/jb/%") == set()
    assert listed("%") == set() and listed("_") == set() and listed("\\") == set()
    assert listed("sestore1/jb/a_") == {"underscore"}
    assert listed("sestore1/jb/_") == set()
    assert listed("sestore1/jb/back\\") == {"backslash"}
    assert listed("sestore1/jb/back\\\\") == set()
    assert listed("sestore1/jb/C") == {"upper"}
    assert listed("sestore1/jb/c") == {"lower", "accent", "decomposed"}
    assert listed("sestore1/jb/it's \"") == {"quote"}
    assert listed("sestore1/jb/café") == {"accent"}
    assert listed("sestore1/jb/cafe") == {"decomposed"}
    assert listed("sestore1/jb/") == set(paths)
    assert listed("sestore1/jb/' OR '1'='1") == set()


def test_invalid_values_are_refused_naming_the_field(live_server, account, requests) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"state": "done"}, "invalid state: 'done' is not one of queued, running, retrying, "),
        ({"state": "FAILED"}, "invalid state: 'FAILED' is not one of"),
        ({"state": "failed,queued"}, "; send a list for several"),
        ({"state": []}, "invalid state: must name at least one state"),
        ({"state": ["failed"] * 7}, "invalid state: must list at most 6 states"),
        ({"state": [1]}, "invalid state: must be a state or a list of states"),
        ({"state": {"failed": 1}}, "invalid state: must be a state or a list of states"),
        ({"state": "\u202e\x1b[31m" + "x" * 500}, "invalid state: '\\u202e\\x1b[31mxxx"),
        ({"created_from": "2026-01-01"}, "invalid created_from: must be a time as"),
        ({"created_from": "2026-13-01 00:00:00"}, "invalid created_from: '2026-13-01 00:00:00' "),
        ({"created_from": "2026-01-01T00:00:00Z"}, "invalid created_from: must be a time as"),
        ({"created_to": -1}, "invalid created_to: must be unix seconds from 0 to"),
        ({"created_to": 10**15}, "invalid created_to: must be unix seconds from 0 to"),
        ({"created_to": True}, "invalid created_to: must be a time as"),
        ({"created_to": 1.5}, "invalid created_to: must be a time as"),
        (
            {"created_from": "2026-01-02 00:00:00", "created_to": "2026-01-01 23:59:59"},
            "invalid created_to: is before created_from",
        ),
        ({"bucket": "a"}, "invalid bucket: must be 3-255 characters"),
        ({"bucket": ["b-one"]}, "invalid bucket: must be a string"),
        ({"path_prefix": ""}, "invalid path_prefix: must not be empty"),
        ({"path_prefix": "x" * 4097}, "invalid path_prefix: must be at most 4096 characters"),
        ({"path_prefix": "a\x00"}, "path_prefix"),
        ({"path_prefix": 5}, "invalid path_prefix: must be a string"),
        ({"after_id": 0}, "invalid after_id: must be at least 1"),
        ({"after_id": "next"}, "invalid after_id: must be an integer"),
        ({"after_id": 5, "offset": 10}, "invalid offset: cannot be combined with after_id"),
    ]
    for fields, message in cases:
        answer = call(live_server.url, account, "aws.status", **fields)
        assert answer["status"] == "failure" and answer["code"] == "0007", (fields, answer)
        assert message in answer["message"], (fields, answer["message"])
        assert "data" not in answer and "total" not in answer
    # A refused value is named, shortened and escaped: never echoed whole.
    long = call(live_server.url, account, "aws.status", state="\u202e" + "x" * 10_000)
    assert len(long["message"]) < 300 and "\u202e" not in long["message"]
    # null means absent, and offset 0 goes with after_id.
    answer = status(live_server.url, account, state=None, after_id=10**9, offset=0)
    assert ids(answer) == named(requests, "abcdefgh") and answer["total"] == 8


def test_keyset_pages_neither_repeat_nor_skip_while_requests_arrive(
    live_server, service, account
) -> None:
    for n in range(40):
        state = (None, "failed", "succeeded")[n % 3]
        queue(service, account, f"sestore1/jb/{('old', 'other')[n % 2]}/{n}.mp4", state=state)
    stop = threading.Event()
    arrived: list[int] = []

    def keep_queuing() -> None:
        # One request after another, each committed before the next takes an id.
        n = 0
        while not stop.is_set() and n < 150:
            arrived.append(queue(service, account, f"sestore1/jb/old/new{n}.mp4"))
            n += 1

    cases: list[tuple[dict[str, Any], Any]] = [
        ({}, lambda row: True),
        ({"state": ["queued", "failed"]}, lambda row: row.state in ("queued", "failed")),
        ({"path_prefix": "sestore1/jb/old/"}, lambda row: row.path.startswith("sestore1/jb/old/")),
        ({"state": "failed"}, lambda row: row.state == "failed"),
    ]
    adder = threading.Thread(target=keep_queuing)
    adder.start()
    try:
        for filters, matches in cases:
            first = status(live_server.url, account, limit=7, **filters)
            seen = ids(first)
            totals = [first["total"]] if filters else []
            while True:
                page = status(live_server.url, account, limit=7, after_id=seen[-1], **filters)
                assert page["total"] >= (totals[-1] if totals else 0)  # only ever more
                totals.append(page["total"])
                if not page["data"]:
                    break
                seen.extend(ids(page))
            # What matched when the first page was read, once each, newest first.
            with service.engine.connect() as conn:
                rows = conn.execute(
                    _T.select().where(_T.c.account_id == account.id, _T.c.id <= seen[0])
                ).all()
            expected = sorted((row.id for row in rows if matches(row)), reverse=True)
            assert seen == expected, filters
    finally:
        stop.set()
        adder.join(30)
    assert len(arrived) > 4  # requests did arrive meanwhile


# -- the Python client and the shells ------------------------------------------------------


def live_client(server: Any, creds: Any) -> Client:
    return Client(server.url, creds.cdn, creds.api_key, creds.api_secret)


def test_python_client_filters_pages_and_totals(live_server, account, requests) -> None:
    with live_client(live_server, account) as api:
        failed = api.status(state="failed")
        assert [r.id for r in failed] == named(requests, "bd") and failed.total == 2
        assert api.status().total is None  # a documented call: no total
        several = api.status(state=("failed", "retrying"), bucket="b-two", limit=1)
        assert [r.id for r in several] == named(requests, "cd")[:1] and several.total == 2
        # Datetimes: naive means UTC, an aware one is turned to UTC; whole seconds.
        plus_one = timezone(timedelta(hours=1))
        window = api.status(
            created_from=datetime(2026, 1, 1, 0, 0, 1, 900_000),
            created_to=datetime(2026, 1, 1, 1, 0, 1, tzinfo=plus_one),
        )
        assert [r.id for r in window] == named(requests, "bc")
        assert api.status(created_from="2026-01-03 00:00:00", created_to=1767484799).total == 2
        prefixed = api.status(path_prefix="sestore1/jb/shows/", after_id=requests["c"])
        assert [r.id for r in prefixed] == named(requests, "ab") and prefixed.total == 4
        # Every page below the last, by after_id, with the filters.
        assert [r.id for r in api.iter_status(page_size=2)] == named(requests, "abcdefgh")
        assert [r.id for r in api.iter_status(page_size=1, bucket="b-one")] == named(
            requests, "abef"
        )
        assert list(api.iter_status(state="canceled", path_prefix="sestore1/jb/movies/")) == []
        with pytest.raises(ApiError) as refused:
            api.status(state="done")
        assert refused.value.code == "0007" and "invalid state" in refused.value.message
        with pytest.raises(ApiError) as refused:
            api.status(offset=3, after_id=5)
        assert "invalid offset: cannot be combined with after_id" in refused.value.message


def test_the_client_hears_the_warnings_of_a_server_that_ignores_a_field(
    live_server, account, requests, monkeypatch
) -> None:
    # A server that does not know path_prefix (older than this client): it says so.
    monkeypatch.setitem(COMMAND_FIELDS, "aws.status", frozenset({"limit", "offset", "state"}))
    with live_client(live_server, account) as api, pytest.warns(ApiWarning) as heard:
        page = api.status(state="failed", path_prefix="sestore1/jb/shows/")
    assert page.warnings == api.last_warnings == ["unknown field 'path_prefix' ignored"]
    assert "unknown field 'path_prefix' ignored" in str(heard[0].message)


@pytest.fixture
def client_env(monkeypatch, live_server, account) -> Any:
    monkeypatch.setenv("VODPUSH_URL", live_server.url + "/stable/")
    monkeypatch.setenv("VODPUSH_CDN", str(account.cdn))
    monkeypatch.setenv("VODPUSH_API_KEY", account.api_key)
    monkeypatch.setenv("VODPUSH_API_SECRET", account.api_secret)
    monkeypatch.setenv("COLUMNS", "250")  # rich folds long cells on narrow terminals
    return account


def test_client_shell_status_filters(client_env, requests, capsys, monkeypatch) -> None:
    argv = ["client", "status", "--state", "failed", "--state", "retrying", "--json"]
    assert main(argv) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == named(requests, "bcd")
    argv = ["client", "status", "--bucket", "b-one", "--path-prefix", "sestore1/jb/shows/"]
    argv += ["--created-from", "2026-01-01 00:00:00", "--created-to", "1767225601", "--json"]
    assert main(argv) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == named(requests, "ab")
    argv = ["client", "status", "--path-prefix", "sestore1/jb/", "--limit", "3"]
    assert main(argv) == 0
    table = capsys.readouterr().out
    cursor = named(requests, "abcdefgh")[2]
    assert f"3 of 8 matching; next page: --after-id {cursor}" in table
    assert main([*argv, "--after-id", str(cursor), "--json"]) == 0
    assert [r["id"] for r in json.loads(capsys.readouterr().out)] == (
        named(requests, "abcdefgh")[3:6]
    )
    assert main(["client", "status", "--state", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: invalid state: 'nope' is not one of queued, running,")
    assert err.rstrip().endswith("(code 0007)")
    # Warnings go to stderr, one line each; the answer still prints.
    monkeypatch.setitem(COMMAND_FIELDS, "aws.status", frozenset({"limit", "offset"}))
    assert main(["client", "status", "--bucket", "b-one", "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "warning: unknown field 'bucket' ignored\n"
    assert json.loads(captured.out)


def test_operator_request_list_filters(cli_env, account, requests, capsys) -> None:
    code, out, err = run_cli(
        capsys, "request", "list", account.api_key, "--state", "failed", "--json"
    )
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)] == named(requests, "bd")
    argv = ["request", "list", account.api_key, "--path-prefix", "sestore1/jb/shows"]
    argv += ["--created-to", "2026-01-03 00:00:00", "--after-id", str(requests["c"])]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    assert [r["id"] for r in json.loads(out)] == named(requests, "ab")
    code, out, err = run_cli(capsys, *argv)
    assert code == 0 and "2 of 4 matching" in out, out
    code, out, err = run_cli(capsys, "request", "list", account.api_key, "--state", "nope")
    assert code == 1 and "invalid state: 'nope' is not one of" in err


def test_filtered_status_calls_leave_the_event_loop() -> None:
    """On SQLite a documented aws.status runs on the event loop; one with a filter or
    after_id counts its matches and may read a whole index range: it runs in a thread."""
    assert is_read_only('{"command":"aws.status","limit":5,"offset":0,"id":3}')
    assert is_read_only('{"command":"aws.status","nosuch":1}')
    for field in ("state", "created_from", "created_to", "bucket", "path_prefix", "after_id"):
        assert not is_read_only(f'{{"command":"aws.status","{field}":"x"}}'), field


def test_prefix_bounds_hold_exactly_the_strings_with_the_prefix() -> None:
    """prefix <= s < bound, compared as UTF-8 bytes (as SQLite compares text), is exactly
    s.startswith(prefix): checked on strings of the code points where carries happen."""
    alphabet = ["a", "b", "%", "_", "\\", "\x7f", "\x80", "\ud7ff", "\ue000", "\U0010ffff"]
    rng = random.Random(7)
    words = ["".join(rng.choices(alphabet, k=rng.randrange(5))) for _ in range(200)]
    for prefix in {w for w in words if w} | {"\U0010ffff", "a\U0010ffff\U0010ffff", "\ud7ff"}:
        bound = prefix_upper_bound(prefix)
        low = prefix.encode()
        for word in words:
            within = low <= word.encode() and (bound is None or word.encode() < bound.encode())
            assert within == word.startswith(prefix), (prefix, word, bound)
    assert prefix_upper_bound("ab") == "ac"
    assert prefix_upper_bound("a\U0010ffff") == "b"
    assert prefix_upper_bound("\ud7ff") == "\ue000"
    assert prefix_upper_bound("\U0010ffff\U0010ffff") is None
