"""aws.upload's object options, acl bucket-default and idempotency_key, the way a customer
uses them: signed requests over HTTP to a live server, a worker uploading to the moto S3
server process, each option read back from the stored object with boto3; on SQLite and
PostgreSQL."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from tests.conftest import MiB, s3_client
from tests.s3server import Intercept, MotoServer, TcpProxy, s3_error
from tests.test_worker import is_public, run_worker, status_of, write_file
from tests.wire import call, envelope, php_style, post, python_style
from vodpush.core.requests import IDEMPOTENCY_WINDOW_SECONDS
from vodpush.persistence.models import UploadRequest
from vodpush.service import Service

TAGS = {
    "show": "Café Crème",  # letters of any script and spaces
    "season": "2",
    "path": "a/b+c=d@e:f_g.h-i",  # every punctuation S3 allows
    "empty": "",
    "日本": "東京",
}
DISPOSITION = "attachment; filename=\"cafe.mp4\"; filename*=UTF-8''caf%C3%A9.mp4"
OPTIONS = {
    "content_type": 'video/mp4; codecs="avc1.64001f"',
    "storage_class": "STANDARD_IA",
    "tags": TAGS,
    "cache_control": "public, max-age=31536000, immutable",
    "content_disposition": DISPOSITION,
}
# Sizes on either side of the test settings' 5 MiB multipart threshold (two parts above).
SIZES = {"single-put": 300_000, "multipart": 5 * MiB + 1}


def upload(url: str, creds: Any, **fields: Any) -> dict[str, Any]:
    return call(url, creds, "aws.upload", **fields)


def queued_id(answer: dict[str, Any]) -> int:
    assert answer["status"] == "success", answer
    assert answer["message"] == "Upload queued"
    return int(answer["data"]["id"])


# -- the options reach the stored object -----------------------------------------------------


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_every_option_is_on_the_stored_object(
    live_server, service, s3_account, s3, bucket, sestore_root, size
) -> None:
    path, data = write_file(sestore_root, "clips/opt.bin", size)
    request_id = queued_id(
        upload(
            live_server.url,
            s3_account,
            path=path,
            destination_path="shows/clip",  # no extension: nothing to guess a type from
            bucket=bucket,
            acl="public-read",
            metadata={"title": "Café"},
            **OPTIONS,
        )
    )
    run_worker(service)

    client = s3_client(s3)
    head = client.head_object(Bucket=bucket, Key="shows/clip")
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == OPTIONS["content_type"]
    assert head["CacheControl"] == OPTIONS["cache_control"]
    assert head["ContentDisposition"] == DISPOSITION
    assert head["StorageClass"] == "STANDARD_IA"
    assert head["ServerSideEncryption"] == "AES256"  # the account's setting still applies
    tag_set = client.get_object_tagging(Bucket=bucket, Key="shows/clip")["TagSet"]
    assert {t["Key"]: t["Value"] for t in tag_set} == TAGS
    assert is_public(client, bucket, "shows/clip")

    record = status_of(live_server.url, s3_account, request_id)
    assert record["state"] == "succeeded", record
    assert record["acl"] == "public-read"
    assert record["options"] == OPTIONS
    # A completed multipart upload is gone at S3: nothing left for the reaper to abort.
    assert service.orphans.count() == 0


@pytest.mark.parametrize("size", list(SIZES.values()), ids=list(SIZES))
def test_a_reference_api_upload_stores_what_it_always_did(
    live_server, service, s3_account, s3, bucket, sestore_root, size
) -> None:
    """Documented fields only: the type guessed from the name, no Cache-Control,
    Content-Disposition, storage class or tags; a private object; no "options" in the
    record. bucket-default stores the same object, and says so in the record."""
    path, _ = write_file(sestore_root, "clips/plain.mp4", size)
    ids = {
        acl: queued_id(
            upload(
                live_server.url,
                s3_account,
                path=path,
                destination_path=f"{acl}/plain.mp4",
                bucket=bucket,
                acl=acl,
            )
        )
        for acl in ("private", "bucket-default")
    }
    run_worker(service)

    client = s3_client(s3)
    heads = {}
    for acl, request_id in ids.items():
        key = f"{acl}/plain.mp4"
        head = client.head_object(Bucket=bucket, Key=key)
        assert head["ContentType"] == "video/mp4"
        for absent in ("CacheControl", "ContentDisposition", "StorageClass"):
            assert absent not in head, (acl, absent)
        assert client.get_object_tagging(Bucket=bucket, Key=key)["TagSet"] == []
        assert not is_public(client, bucket, key)
        heads[acl] = {
            k: v for k, v in head.items() if k not in ("ResponseMetadata", "LastModified")
        }
        record = status_of(live_server.url, s3_account, request_id)
        assert record["state"] == "succeeded", record
        assert record["acl"] == acl
        assert "options" not in record
    assert heads["private"] == heads["bucket-default"]


@pytest.fixture
def acls_disabled(service: Service, s3_account: Any, s3: MotoServer) -> Any:
    """The account's S3 endpoint behaves as a bucket with ACLs disabled (Object Ownership
    "bucket owner enforced", R2, B2): the first request carrying an ACL header is refused
    with AccessControlListNotSupported (moto itself does not enforce that)."""
    proxy = TcpProxy(s3.port).start()
    refusal = proxy.intercept(
        Intercept(
            marker=b"\r\nx-amz-acl:",
            answer=s3_error(400, "AccessControlListNotSupported", "The bucket does not allow ACLs"),
        )
    )
    service.accounts.set_s3(s3_account.api_key, s3.settings(endpoint_url=proxy.url))
    yield refusal
    proxy.stop()


def test_private_and_bucket_default_send_no_acl_so_acl_less_buckets_work(
    live_server, service, s3_account, s3, bucket, sestore_root, acls_disabled
) -> None:
    small, _ = write_file(sestore_root, "small.mp4", 1000)
    big, _ = write_file(sestore_root, "big.mp4", SIZES["multipart"])
    ids = [
        queued_id(
            upload(
                live_server.url,
                s3_account,
                path=path,
                destination_path=f"{acl}/{Path(path).name}",
                bucket=bucket,
                acl=acl,
            )
        )
        for acl in ("private", "bucket-default")
        for path in (small, big)
    ]
    run_worker(service)
    assert not acls_disabled.done.is_set()  # no request carried an ACL header
    for request_id in ids:
        assert status_of(live_server.url, s3_account, request_id)["state"] == "succeeded"

    # public-read does send one: such a bucket refuses it, and the request says why.
    public = queued_id(
        upload(
            live_server.url,
            s3_account,
            path=small,
            destination_path="public/small.mp4",
            bucket=bucket,
            acl="public-read",
        )
    )
    run_worker(service)
    assert acls_disabled.done.is_set()
    record = status_of(live_server.url, s3_account, public)
    assert record["state"] == "failed"
    assert record["error_code"] == "AccessControlListNotSupported"


# -- refusals --------------------------------------------------------------------------------

REFUSED = [
    ("content_type", "", "must not be empty"),
    ("content_type", "video", "must be a media type"),
    ("content_type", "video/mp4\r\nX-Evil: 1", "printable ASCII"),
    ("content_type", "vidéo/mp4", "printable ASCII"),
    ("content_type", "video/" + "a" * 300, "at most 255 characters"),
    ("content_type", 7, "must be a string"),
    ("storage_class", "standard", "must be one of STANDARD, REDUCED_REDUNDANCY"),
    ("storage_class", "AWS_BACKUP_WARM", "must be one of"),
    ("storage_class", ["GLACIER"], "must be one of"),
    ("tags", "a=b", "must be an object"),
    ("tags", {f"k{i}": "v" for i in range(11)}, "has 11 tags; S3 allows at most 10"),
    ("tags", {"": "v"}, "must be 1-128 characters"),
    ("tags", {"k" * 129: "v"}, "must be 1-128 characters"),
    ("tags", {"k": "v" * 257}, "must be at most 256 characters"),
    ("tags", {"aws:createdBy": "me"}, "which S3 reserves"),
    ("tags", {"AWS:x": "me"}, "which S3 reserves"),
    ("tags", {"a;b": "v"}, "may hold only letters, digits, spaces"),
    ("tags", {"k": "v&w"}, "may hold only letters, digits, spaces"),
    ("tags", {"k": "line\nbreak"}, "may hold only letters, digits, spaces"),
    ("tags", {"k": {"nested": "x"}}, "must be a string or a number"),
    ("cache_control", "", "must not be empty"),
    ("cache_control", "max-age=1\nX: y", "printable ASCII"),
    ("cache_control", "x" * 1025, "at most 1024 characters"),
    ("content_disposition", 'attachment; filename="café.mp4"', "printable ASCII"),
    ("content_disposition", "; filename=x", "must start with a disposition type"),
    ("content_disposition", {"type": "attachment"}, "must be a string"),
    ("acl", "bucket-owner-full-control", "must be one of private, public-read, bucket-default"),
    ("idempotency_key", "", "must be 1-255 printable ASCII characters"),
    ("idempotency_key", "k" * 256, "must be 1-255 printable ASCII characters"),
    ("idempotency_key", "ключ", "must be 1-255 printable ASCII characters"),
    ("idempotency_key", "a\tb", "must be 1-255 printable ASCII characters"),
    ("idempotency_key", 42, "must be a string"),
]


def test_each_invalid_value_is_refused_naming_the_field(
    live_server, service, account, sestore_root
) -> None:
    path, _ = write_file(sestore_root, "a.mp4", 10)
    base = {"path": path, "destination_path": "a.mp4", "bucket": "my-bucket", "acl": "private"}
    for field, value, why in REFUSED:
        answer = upload(live_server.url, account, **{**base, field: value})
        assert answer["status"] == "failure", (field, value)
        assert answer["code"] == "0007", (field, value, answer)
        assert answer["message"].startswith(f"invalid {field}: "), answer["message"]
        assert why in answer["message"], (field, value, answer["message"])
    assert call(live_server.url, account, "aws.status")["data"] == []  # nothing queued
    # What is allowed at the edges.
    edges = {
        "idempotency_key": "~" + "k" * 253 + " ",
        "tags": {"k" * 128: "v" * 256, **{f"t{i}": str(i) for i in range(9)}},
        "content_type": 'application/x.vendor+json; version=2; q="a \\" b"',
        "content_disposition": "inline",
        "storage_class": "DEEP_ARCHIVE",
    }
    answer = upload(live_server.url, account, **base, **edges)
    assert answer["status"] == "success", answer
    # Null, {} and [] (PHP's empty array) set nothing.
    plain = upload(live_server.url, account, **{**base, "destination_path": "b.mp4"},
                   tags=[], content_type=None, idempotency_key=None)  # fmt: skip
    entry = status_of(live_server.url, account, queued_id(plain))
    assert "options" not in entry


# -- idempotency keys ------------------------------------------------------------------------


def signed(creds: Any, *, age: int = 0, style: Any = php_style, **fields: Any) -> str:
    """An aws.upload as a client would send it, signed ``age`` seconds ago (each age and
    style is another signature: another request, as far as replays go)."""
    payload = envelope(creds, "aws.upload", **fields)
    payload["timestamp"] -= age
    return style(payload, creds.api_secret)


def send(url: str, text: str) -> dict[str, Any]:
    response = post(url, text)
    assert response.status_code == 200, response.text
    answer = response.json()
    answer.pop("handle_time")
    return answer


def _age_request(service: Service, request_id: int, seconds: float) -> None:
    table = UploadRequest.__table__
    assert service.engine is not None
    with service.engine.begin() as conn:
        created = conn.execute(
            select(table.c.created_at).where(table.c.id == request_id)
        ).scalar_one()
        conn.execute(
            table.update()
            .where(table.c.id == request_id)
            .values(created_at=created - timedelta(seconds=seconds))
        )


def test_an_idempotency_key_answers_the_first_request_for_24_hours(
    live_server, service, account, sestore_root
) -> None:
    path, _ = write_file(sestore_root, "a.mp4", 10)
    fields = {
        "path": path,
        "destination_path": "a.mp4",
        "bucket": "my-bucket",
        "acl": "private",
        "metadata": {"title": "Café"},
        "tags": {"show": "x"},
        "idempotency_key": "order-2026-0001",
    }
    first = send(live_server.url, signed(account, **fields))
    first_id = queued_id(first)
    # Another signature (another style, another second): exactly the first answer.
    for age, style in ((5, python_style), (60, php_style)):
        assert send(live_server.url, signed(account, age=age, style=style, **fields)) == first
    # The same fields in another order and spelling are the same upload.
    reordered = dict(reversed(list(fields.items())))
    assert send(live_server.url, signed(account, age=7, **reordered)) == first

    # Other fields under the key: refused, saying only that the key is taken.
    for change in (
        {"destination_path": "b.mp4"},
        {"acl": "public-read"},
        {"metadata": {"title": "Cafe"}},
        {"tags": {"show": "y"}},
        {"storage_class": "GLACIER"},
        {"callback": "http://127.0.0.1:9/hook"},
    ):
        answer = send(live_server.url, signed(account, age=9, **{**fields, **change}))
        assert answer["status"] == "failure" and answer["code"] == "0007", (change, answer)
        assert answer["message"].startswith("invalid idempotency_key: was used in the last 24")
        assert str(first_id) not in answer["message"]
    assert [r["id"] for r in call(live_server.url, account, "aws.status")["data"]] == [first_id]

    # A day later the key is free again: it names a new request (with any fields).
    _age_request(service, first_id, IDEMPOTENCY_WINDOW_SECONDS + 60)
    later = send(live_server.url, signed(account, age=11, **{**fields, "acl": "public-read"}))
    second_id = queued_id(later)
    assert second_id != first_id
    assert send(live_server.url, signed(account, age=13, **fields))["status"] == "failure"
    again = send(live_server.url, signed(account, age=15, **{**fields, "acl": "public-read"}))
    assert again == later


def test_concurrent_identical_submits_with_one_key_queue_one_request(
    live_server, service, account, sestore_root
) -> None:
    path, _ = write_file(sestore_root, "a.mp4", 10)
    fields = {
        "path": path,
        "destination_path": "race.mp4",
        "bucket": "my-bucket",
        "acl": "private",
        "storage_class": "GLACIER_IR",
        "idempotency_key": "race",
    }
    bodies = [signed(account, age=n, **fields) for n in range(10)]  # ten signatures
    start = threading.Barrier(len(bodies))
    answers: list[dict[str, Any]] = []

    def submit(text: str) -> None:
        start.wait()
        answers.append(send(live_server.url, text))

    threads = [threading.Thread(target=submit, args=(text,)) for text in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == len(bodies)
    assert all(answer == answers[0] for answer in answers), answers
    request_id = queued_id(answers[0])
    listed = call(live_server.url, account, "aws.status")["data"]
    assert [entry["id"] for entry in listed] == [request_id]
