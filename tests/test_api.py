"""The signed API over real HTTP: every client encoding, every failure code, replays,
tenant isolation, validation and aws.status formats, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from tests.wire import STYLES, call, envelope, php_style, post
from vodpush.api.dispatch import is_read_only

FILE = "sestore1/jb/videos/clip.mp4"


@pytest.fixture
def clip(account, sestore_root: Path) -> str:
    target = sestore_root / "sestore1" / "jb" / "videos" / "clip.mp4"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000)
    return FILE


def upload_fields(**overrides):
    fields = {
        "path": FILE,
        "destination_path": "path/to/file.mp4",
        "bucket": "my-bucket",
        "acl": "private",
        "metadata": {"title": "Ünïcode / slashes", "show": "a/b"},
        "callback": "",
    }
    fields.update(overrides)
    return fields


# -- encodings ----------------------------------------------------------------------------


@pytest.mark.parametrize("style", sorted(STYLES))
@pytest.mark.parametrize("encoding", ["urlencoded", "multipart", "raw"])
def test_every_client_encoding_queues_and_reads_back(live_server, account, clip, style, encoding):
    answer = call(
        live_server.url, account, "aws.upload", style=style, encoding=encoding, **upload_fields()
    )
    assert answer["status"] == "success", answer
    request_id = answer["data"]["id"]
    assert isinstance(request_id, int)
    status = call(
        live_server.url, account, "aws.status", style=style, encoding=encoding, id=request_id
    )
    assert status["status"] == "success", status
    (record,) = status["data"]
    assert record["id"] == request_id
    assert record["metadata"] == {"title": "Ünïcode / slashes", "show": "a/b"}
    assert record["message"] == "Queued"


def test_php_escaping_is_reproduced_byte_for_byte(account):
    payload = envelope(account, "aws.status", note="a/b é")
    text = php_style(payload, account.api_secret)
    assert '"note":"a\\/b \\u00e9"' in text
    assert re.search(r',"signature":"[A-Za-z0-9+\\/=]+"}$', text)


def test_all_api_paths_answer(live_server, account):
    for path in ("/stable/", "/dev/", "/"):
        payload = envelope(account, "aws.status")
        response = post(live_server.url, php_style(payload, account.api_secret), path=path)
        assert response.status_code == 200
        assert response.json()["status"] == "success"


def test_integers_as_digit_strings(live_server, account, clip):
    payload = envelope(account, "aws.status", limit="5", offset="0")
    payload["cdn"] = str(payload["cdn"])
    payload["timestamp"] = str(payload["timestamp"])
    answer = post(live_server.url, php_style(payload, account.api_secret)).json()
    assert answer["status"] == "success", answer


# -- failure codes ------------------------------------------------------------------------


def test_envelope_of_a_failure(live_server, account):
    answer = call(live_server.url, account, "aws.nothing")
    assert answer["status"] == "failure"
    assert answer["code"] == "0000"
    assert "aws.nothing" in answer["message"]
    assert isinstance(answer["handle_time"], float)


def test_0001_unknown_api_key_and_wrong_cdn(live_server, account, make_account):
    other = make_account(cdn=200, username="other")
    payload = envelope(account, "aws.status")
    payload["api_key"] = "X" * 32
    answer = post(live_server.url, php_style(payload, account.api_secret)).json()
    assert answer["code"] == "0001"
    payload = envelope(account, "aws.status")
    payload["cdn"] = other.cdn  # a real cdn, but not this key's
    answer = post(live_server.url, php_style(payload, account.api_secret)).json()
    assert answer["code"] == "0001"


@pytest.mark.parametrize("skew", [-330, 330, -100000])
def test_0002_timestamp_outside_window(live_server, account, skew):
    payload = envelope(account, "aws.status")
    payload["timestamp"] = int(time.time()) + skew
    answer = post(live_server.url, php_style(payload, account.api_secret)).json()
    assert answer["status"] == "failure"
    assert answer["code"] == "0002"
    assert "UTC" in answer["message"]


def test_timestamp_inside_window_is_accepted(live_server, account):
    payload = envelope(account, "aws.status")
    payload["timestamp"] = int(time.time()) - 250
    assert post(live_server.url, php_style(payload, account.api_secret)).json()["status"] == (
        "success"
    )


def test_0003_wrong_secret_and_tampering(live_server, account):
    answer = call(live_server.url, account, "aws.status", secret="0" * 64)
    assert answer["code"] == "0003"
    # Sign one request, then change a field after signing.
    payload = envelope(account, "aws.status", limit=5)
    signed = php_style(payload, account.api_secret).replace('"limit":5', '"limit":6')
    assert post(live_server.url, signed).json()["code"] == "0003"
    # A signature that is not even base64.
    bad = php_style(payload, account.api_secret)
    bad = re.sub(r'"signature":"[^"]+"', '"signature":"!!!"', bad)
    assert post(live_server.url, bad).json()["code"] == "0003"


def test_0004_unexpected_error_leaks_nothing(live_server, account, service):
    with service.engine.begin() as conn:
        conn.execute(text("ALTER TABLE upload_requests RENAME TO gone_requests"))
    answer = call(live_server.url, account, "aws.status")
    assert answer["status"] == "failure"
    assert answer["code"] == "0004"
    for leak in ("upload_requests", "SELECT", "Traceback", "sqlalchemy", "psycopg"):
        assert leak.lower() not in answer["message"].lower()


def test_0005_disabled_account(live_server, account, service):
    service.accounts.set_enabled(account.api_key, False)
    answer = call(live_server.url, account, "aws.status")
    assert answer["code"] == "0005"
    service.accounts.set_enabled(account.api_key, True)
    assert call(live_server.url, account, "aws.status")["status"] == "success"


def test_0006_missing_fields_are_named(live_server, account, clip):
    payload = envelope(account, "aws.status")
    del payload["timestamp"]
    answer = post(live_server.url, php_style(payload, account.api_secret)).json()
    assert answer["code"] == "0006"
    assert "timestamp" in answer["message"]
    answer = call(live_server.url, account, "aws.upload", path=FILE, acl="private")
    assert answer["code"] == "0006"
    assert "destination_path" in answer["message"] and "bucket" in answer["message"]
    unsigned = json.dumps(envelope(account, "aws.status"))
    answer = post(live_server.url, unsigned).json()
    assert answer["code"] == "0006" and "signature" in answer["message"]


def test_unreadable_requests_get_http_errors(live_server):
    assert httpx.post(live_server.url + "/stable/", data={"other": "x"}).status_code == 400
    assert httpx.post(live_server.url + "/stable/", data={"json": "{not json"}).status_code == 400
    assert httpx.post(live_server.url + "/stable/", data={"json": "[1,2]"}).status_code == 400
    assert httpx.get(live_server.url + "/stable/").status_code == 405
    big = "x" * (2 * 1024 * 1024)
    response = httpx.post(live_server.url + "/stable/", data={"json": big})
    assert response.status_code == 413


def test_duplicate_keys_are_refused(live_server, account):
    payload = envelope(account, "aws.status")
    signed = php_style(payload, account.api_secret)
    doubled = signed.replace(
        '{"command":"aws.status"', '{"command":"aws.status","limit":1,"limit":2'
    )
    response = post(live_server.url, doubled)
    assert response.status_code == 400
    assert "duplicate" in response.json()["message"]


# -- aws.upload ----------------------------------------------------------------------------


def test_replayed_upload_queues_once(live_server, account, clip, service):
    payload = envelope(account, "aws.upload", **upload_fields())
    signed = php_style(payload, account.api_secret)
    first = post(live_server.url, signed).json()
    second = post(live_server.url, signed, encoding="multipart").json()
    assert first["status"] == second["status"] == "success"
    assert first["data"] == second["data"]
    status = call(live_server.url, account, "aws.status")
    assert [r["id"] for r in status["data"]] == [first["data"]["id"]]


def test_same_fields_with_a_new_signature_queue_again(live_server, account, clip):
    first = call(live_server.url, account, "aws.upload", **upload_fields())
    time.sleep(1.01)  # a new timestamp, so a new signature
    second = call(live_server.url, account, "aws.upload", **upload_fields())
    assert first["data"]["id"] != second["data"]["id"]


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("sestore1/jb/../other/secret.mp4", "'..'"),
        ("sestore1/jb/videos/../../other/secret.mp4", "'..'"),
        ("/etc/passwd", "relative"),
        ("sestore1/jb/videos/clip.mp4\x00.txt", "NUL"),
        ("sestore1/other/secret.mp4", "your own"),
        ("sestore1/jb/escape.mp4", "outside"),
        ("sestore1/jb/dirlink/secret.mp4", "outside"),
        ("sestore1/jb/missing.mp4", "no such file"),
        ("sestore1/jb/videos", "not a regular file"),
        ("sestore9/jb/videos/clip.mp4", "no such store"),
        ("store1/jb/videos/clip.mp4", "sestore<N>"),
        ("sestore1\\jb\\videos\\clip.mp4", "relative"),
        ("sestore1/jb//videos/clip.mp4", "empty"),
        ("sestore1/jb", "sestore<N>/<username>/<file>"),
    ],
)
def test_path_escapes_are_refused(live_server, account, clip, sestore_root, path, why):
    other = sestore_root / "sestore1" / "other"
    other.mkdir(exist_ok=True)
    (other / "secret.mp4").write_bytes(b"secret")
    jb = sestore_root / "sestore1" / "jb"
    if not (jb / "escape.mp4").is_symlink():
        (jb / "escape.mp4").symlink_to(other / "secret.mp4")
        (jb / "dirlink").symlink_to(other)
    answer = call(live_server.url, account, "aws.upload", **upload_fields(path=path))
    assert answer["status"] == "failure", answer
    assert answer["code"] == "0007"
    assert "path" in answer["message"]
    assert why in answer["message"]


def test_symlink_inside_own_directory_is_allowed(live_server, account, clip, sestore_root):
    jb = sestore_root / "sestore1" / "jb"
    (jb / "alias.mp4").symlink_to(jb / "videos" / "clip.mp4")
    answer = call(
        live_server.url, account, "aws.upload", **upload_fields(path="sestore1/jb/alias.mp4")
    )
    assert answer["status"] == "success", answer


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("acl", "public-read-write", "acl"),
        ("acl", "PRIVATE", "acl"),
        ("bucket", "a", "bucket"),
        ("bucket", "bad bucket!", "bucket"),
        ("destination_path", "", "destination_path"),
        ("destination_path", "/abs/key.mp4", "destination_path"),
        ("destination_path", "k" * 1025, "destination_path"),
        ("destination_path", "a\nb", "destination_path"),
        ("metadata", {"bad key": "v"}, "metadata"),
        ("metadata", {"k": "v" * 2100}, "metadata"),
        ("metadata", {"k": {"nested": 1}}, "metadata"),
        ("metadata", {"Key": "a", "key": "b"}, "metadata"),
        ("metadata", "{}", "metadata"),
        ("callback", "ftp://example.com/x", "callback"),
        ("callback", "http://", "callback"),
        ("callback", 5, "callback"),
        ("path", 12, "path"),
    ],
)
def test_invalid_upload_fields_are_named(live_server, account, clip, field, value, needle):
    answer = call(live_server.url, account, "aws.upload", **upload_fields(**{field: value}))
    assert answer["status"] == "failure", answer
    assert answer["code"] == "0007"
    assert needle in answer["message"]


def test_php_empty_array_metadata_and_schemeless_callback(live_server, account, clip):
    answer = call(
        live_server.url,
        account,
        "aws.upload",
        **upload_fields(metadata=[], callback="www.example.com/hook"),
    )
    assert answer["status"] == "success", answer
    (record,) = call(live_server.url, account, "aws.status", id=answer["data"]["id"])["data"]
    assert record["metadata"] == {}
    assert record["callback"] == "www.example.com/hook"


# -- aws.status ---------------------------------------------------------------------------

DOCUMENTED = {
    "id": int,
    "cdn_id": int,
    "path": str,
    "destination_path": str,
    "metadata": dict,
    "acl": str,
    "callback": str,
    "message": str,
    "results": dict,
    "created": str,
    "last_updated": str,
    "status": int,
}
RESULT_KEYS = {
    "Bucket",
    "ETag",
    "Expiration",
    "Key",
    "Location",
    "ObjectURL",
    "RequestCharged",
    "SSEKMSKeyId",
    "ServerSideEncryption",
    "VersionId",
}


def test_status_record_has_every_documented_field(live_server, account, clip):
    call(live_server.url, account, "aws.upload", **upload_fields(callback="https://cb.example/x"))
    answer = call(live_server.url, account, "aws.status")
    assert answer["message"] == "Found AWS Status"
    (record,) = answer["data"]
    for field, kind in DOCUMENTED.items():
        assert isinstance(record[field], kind), (field, record[field])
    assert set(record["results"]) == RESULT_KEYS
    assert record["cdn_id"] == account.cdn
    assert record["path"] == FILE
    assert record["destination_path"] == "path/to/file.mp4"
    assert record["acl"] == "private"
    assert record["callback"] == "https://cb.example/x"
    assert record["status"] == 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", record["created"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", record["last_updated"])
    created = time.strptime(record["created"] + " UTC", "%Y-%m-%d %H:%M:%S %Z")
    assert abs(time.mktime(created) - time.mktime(time.gmtime())) < 120  # UTC, not local


def test_status_paging_newest_first(live_server, account, clip, service):
    ids = [
        call(live_server.url, account, "aws.upload", **upload_fields(destination_path=f"k{i}"))[
            "data"
        ]["id"]
        for i in range(30)
    ]
    default = call(live_server.url, account, "aws.status")["data"]
    assert [r["id"] for r in default] == sorted(ids, reverse=True)[:25]
    page = call(live_server.url, account, "aws.status", limit=10, offset=25)["data"]
    assert [r["id"] for r in page] == sorted(ids, reverse=True)[25:]
    answer = call(live_server.url, account, "aws.status", limit=1001)
    assert answer["code"] == "0007" and "limit" in answer["message"]
    answer = call(live_server.url, account, "aws.status", limit=0)
    assert answer["code"] == "0007"
    answer = call(live_server.url, account, "aws.status", offset=-1)
    assert answer["code"] == "0007" and "offset" in answer["message"]
    answer = call(live_server.url, account, "aws.status", limit="ten")
    assert answer["code"] == "0007"


def test_tenant_isolation(live_server, account, make_account, clip, sestore_root):
    other = make_account(cdn=159, username="kim")
    (sestore_root / "sestore1" / "kim" / "a.mp4").write_bytes(b"kim")
    mine = call(live_server.url, account, "aws.upload", **upload_fields())["data"]["id"]
    theirs = call(live_server.url, other, "aws.upload", **upload_fields(path="sestore1/kim/a.mp4"))[
        "data"
    ]["id"]
    assert [r["id"] for r in call(live_server.url, account, "aws.status")["data"]] == [mine]
    assert [r["id"] for r in call(live_server.url, other, "aws.status")["data"]] == [theirs]
    assert call(live_server.url, account, "aws.status", id=theirs)["data"] == []
    # Another account's file is out of reach even with a valid signature.
    answer = call(
        live_server.url, account, "aws.upload", **upload_fields(path="sestore1/kim/a.mp4")
    )
    assert answer["code"] == "0007"


def test_healthz(live_server):
    assert httpx.get(live_server.url + "/healthz").json() == {"status": "ok"}


def test_read_only_commands_are_recognised_without_trusting_the_text() -> None:
    # Only where a command runs depends on this look; handle() still checks everything.
    assert is_read_only('{"command":"aws.status","cdn":1}')
    assert not is_read_only('{"command":"aws.upload","cdn":1}')
    assert not is_read_only('{"command":"aws.statusx"}')
    assert not is_read_only('["aws.status"]')
    assert not is_read_only("json=not json")
    assert not is_read_only('{"cdn":1}')
