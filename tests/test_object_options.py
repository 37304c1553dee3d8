"""ObjectOptions: the one table of allowed S3 object options, checked when built, and passed
the same to PutObject and CreateMultipartUpload (the last test against the moto process)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import pytest

from tests.s3server import MotoServer
from vodpush.core.checkpoint import MemoryLedger
from vodpush.core.options import CANNED_ACLS, STORAGE_CLASSES, tagging_header
from vodpush.transfer import ObjectOptions, UploadJob, upload
from vodpush.transfer.options import OPTIONS
from vodpush.transfer.s3client import make_s3_client

MiB = 1024 * 1024
KMS_KEY = "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555"
ALL_USERS = "http://acs.amazonaws.com/groups/global/AllUsers"


def s3_arguments(options: ObjectOptions, key: str = "v/clip.mp4") -> dict[str, Any]:
    return options.s3_arguments(key=key, file_name="upload.bin")


# -- the table ------------------------------------------------------------------------------


def test_table_names_every_field_and_real_s3_arguments(s3: MotoServer) -> None:
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(ObjectOptions)}
    assert set(OPTIONS) == {
        "acl",
        "content_type",
        "metadata",
        "sse",
        "sse_kms_key_id",
        "checksums",
        "storage_class",
        "tags",
        "cache_control",
        "content_disposition",
    }
    names = [option.s3_name for option in OPTIONS.values()]
    assert len(set(names)) == len(names)
    # Every entry is an argument that both operations take, by botocore's own S3 model.
    model = make_s3_client(s3.settings()).meta.service_model
    for operation in ("PutObject", "CreateMultipartUpload"):
        members = model.operation_model(operation).input_shape.members
        assert set(names) <= set(members), operation


def test_every_storage_class_is_one_s3_knows(s3: MotoServer) -> None:
    model = make_s3_client(s3.settings()).meta.service_model
    known = model.shape_for("StorageClass").enum
    assert set(STORAGE_CLASSES) <= set(known)
    assert {"STANDARD", "STANDARD_IA", "GLACIER", "DEEP_ARCHIVE", "GLACIER_IR"} <= set(
        STORAGE_CLASSES
    )


def test_tags_travel_as_an_unambiguous_query_string() -> None:
    # Space as %20 and '+' as %2B: a reader that takes '+' for a space still reads it right.
    assert tagging_header({"a b": "c+d", "k": "", "é": "/=&"}) == (
        "a%20b=c%2Bd&k=&%C3%A9=%2F%3D%26"
    )
    assert tagging_header({}) == ""


def test_defaults() -> None:
    assert s3_arguments(ObjectOptions()) == {
        "ContentType": "video/mp4",
        "Metadata": {},
        "ChecksumAlgorithm": "SHA256",
    }


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (
            ObjectOptions(acl="private", checksums=False),
            {"ContentType": "video/mp4", "Metadata": {}},
        ),
        (
            ObjectOptions(acl="public-read", sse="AES256"),
            {
                "ACL": "public-read",
                "ContentType": "video/mp4",
                "Metadata": {},
                "ServerSideEncryption": "AES256",
                "ChecksumAlgorithm": "SHA256",
            },
        ),
        (
            ObjectOptions(sse="aws:kms", checksums=False),
            {"ContentType": "video/mp4", "Metadata": {}, "ServerSideEncryption": "aws:kms"},
        ),
        (
            ObjectOptions(sse="aws:kms", sse_kms_key_id=KMS_KEY),
            {
                "ContentType": "video/mp4",
                "Metadata": {},
                "ServerSideEncryption": "aws:kms",
                "SSEKMSKeyId": KMS_KEY,
                "ChecksumAlgorithm": "SHA256",
            },
        ),
        (
            # An empty key id means none (the account's column may hold "").
            ObjectOptions(sse="aws:kms", sse_kms_key_id="", checksums=False),
            {"ContentType": "video/mp4", "Metadata": {}, "ServerSideEncryption": "aws:kms"},
        ),
        (
            # Metadata travels as S3 takes it: non-ASCII values as RFC 2047 encoded words.
            ObjectOptions(metadata={"title": "Café", "plain": "hello"}, checksums=False),
            {
                "ContentType": "video/mp4",
                "Metadata": {"title": "=?UTF-8?B?Q2Fmw6k=?=", "plain": "hello"},
            },
        ),
        (
            # A chosen Content-Type is sent as it is, not guessed.
            ObjectOptions(content_type="application/x-custom", checksums=False),
            {"ContentType": "application/x-custom", "Metadata": {}},
        ),
        (
            # The bucket decides: no ACL at all, as for private.
            ObjectOptions(acl="bucket-default", checksums=False),
            {"ContentType": "video/mp4", "Metadata": {}},
        ),
        (
            ObjectOptions(
                storage_class="GLACIER_IR",
                tags={"show": "Café Crème", "n": "1"},
                cache_control="max-age=60",
                content_disposition='attachment; filename="a.mp4"',
                checksums=False,
            ),
            {
                "ContentType": "video/mp4",
                "Metadata": {},
                "StorageClass": "GLACIER_IR",
                "Tagging": "show=Caf%C3%A9%20Cr%C3%A8me&n=1",
                "CacheControl": "max-age=60",
                "ContentDisposition": 'attachment; filename="a.mp4"',
            },
        ),
        (
            # Empty tags are none.
            ObjectOptions(tags={}, checksums=False),
            {"ContentType": "video/mp4", "Metadata": {}},
        ),
    ],
)
def test_s3_arguments_of_each_combination(options: ObjectOptions, expected: dict[str, Any]) -> None:
    assert s3_arguments(options) == expected


@pytest.mark.parametrize("acl", CANNED_ACLS)
def test_every_canned_acl_but_private_is_sent(acl: str) -> None:
    # "private" is S3's default: left out, so buckets with ACLs disabled keep working.
    sent = s3_arguments(ObjectOptions(acl=acl)).get("ACL")
    assert sent == (None if acl == "private" else acl)


def test_content_type_is_guessed_from_the_key_then_the_file_name() -> None:
    options = ObjectOptions()
    assert options.s3_arguments(key="a.m3u8", file_name="x.mp4")["ContentType"] == (
        "application/vnd.apple.mpegurl"
    )
    assert options.s3_arguments(key="noext", file_name="x.ts")["ContentType"] == "video/mp2t"
    assert options.s3_arguments(key="noext", file_name="noext")["ContentType"] == (
        "application/octet-stream"
    )


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"acl": "public"}, "acl must be one of private, public-read, public-read-write, "),
        ({"acl": None}, "acl must be one of private, "),
        ({"sse": "aws:kms:dsse"}, "sse must be None or one of AES256, aws:kms"),
        ({"sse": "aes256"}, "sse must be None or one of AES256, aws:kms"),
        ({"sse": "AES256", "sse_kms_key_id": "k"}, "sse_kms_key_id needs sse='aws:kms'"),
        ({"sse_kms_key_id": "k"}, "sse_kms_key_id needs sse='aws:kms'"),
        ({"sse": "aws:kms", "sse_kms_key_id": 5}, "sse_kms_key_id must be None or a string"),
        ({"metadata": {"n": 1}}, "metadata keys and values must be strings"),
        ({"metadata": {1: "n"}}, "metadata keys and values must be strings"),
        ({"metadata": ["a", "b"]}, "metadata keys and values must be strings"),
        ({"checksums": "yes"}, "checksums must be True or False"),
        ({"checksums": 1}, "checksums must be True or False"),
        # A header value an attacker could split into a second header is refused.
        ({"content_type": "text/html\r\nX-Evil: 1"}, "content_type must be printable ASCII"),
        ({"content_type": "vidéo/mp4"}, "content_type must be printable ASCII"),
        ({"content_type": ""}, "content_type must not be empty"),
        ({"content_type": "mp4"}, "content_type must be a media type"),
        ({"storage_class": "glacier"}, "storage_class must be one of STANDARD, "),
        ({"tags": {"aws:x": "1"}}, "tags key 'aws:x' starts with 'aws:'"),
        ({"tags": {"k": 1}}, "tags keys and values must be strings"),
        ({"tags": {str(i): "" for i in range(11)}}, "tags has 11 tags"),
        ({"cache_control": "a\nb"}, "cache_control must be printable ASCII"),
        ({"content_disposition": "=x"}, "content_disposition must start with a disposition"),
    ],
)
def test_refusals_name_the_option_and_what_is_allowed(values: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as info:
        ObjectOptions(**values)
    assert str(info.value).startswith(message)


def test_an_unknown_option_is_refused() -> None:
    with pytest.raises(TypeError, match="website_redirect"):
        ObjectOptions(website_redirect="/x")  # type: ignore[call-arg]


def test_options_are_frozen_and_keep_their_own_metadata() -> None:
    metadata = {"title": "one"}
    options = ObjectOptions(metadata=metadata)
    metadata["title"] = "changed"
    metadata["extra"] = "added"
    assert dict(options.metadata) == {"title": "one"}
    tags = {"a": "1"}
    tagged = ObjectOptions(tags=tags)
    tags["b"] = "2"
    assert dict(tagged.tags) == {"a": "1"}
    with pytest.raises(TypeError):
        tagged.tags["c"] = "3"  # type: ignore[index]
    with pytest.raises(TypeError):
        options.metadata["title"] = "two"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.acl = "public-read"  # type: ignore[misc]
    # replace() checks again.
    with pytest.raises(ValueError, match="acl must be one of"):
        dataclasses.replace(options, acl="public")
    assert dataclasses.replace(options, acl="public-read") == ObjectOptions(
        acl="public-read", metadata={"title": "one"}
    )


def test_upload_job_takes_only_object_options(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="options must be an ObjectOptions"):
        UploadJob(source=tmp_path / "x", bucket="b", key="k", options={"acl": "private"})  # type: ignore[arg-type]
    assert UploadJob(source=tmp_path / "x", bucket="b", key="k").options == ObjectOptions()


# -- PutObject and CreateMultipartUpload get the same arguments -----------------------------


def capture_params(client: Any) -> dict[str, list[dict[str, Any]]]:
    """The parameters of every PutObject and CreateMultipartUpload, as botocore gets them."""
    seen: dict[str, list[dict[str, Any]]] = {"PutObject": [], "CreateMultipartUpload": []}

    def record(params: dict[str, Any], event_name: str, **_: Any) -> None:
        seen[event_name.rsplit(".", 1)[-1]].append(dict(params))

    for operation in seen:
        client.meta.events.register(f"before-parameter-build.s3.{operation}", record)
    return seen


@pytest.mark.parametrize(
    "options",
    [
        ObjectOptions(acl="public-read", metadata={"title": "Café ☕"}, sse="AES256"),
        ObjectOptions(sse="aws:kms", sse_kms_key_id=KMS_KEY, checksums=False),
        ObjectOptions(
            acl="bucket-default",
            storage_class="STANDARD_IA",
            tags={"a b": "c+d"},
            cache_control="no-cache",
            content_disposition="inline",
            sse="AES256",
        ),
    ],
)
def test_single_put_and_multipart_send_the_same_object_arguments(
    s3: MotoServer, bucket: str, tmp_path: Path, options: ObjectOptions
) -> None:
    client = make_s3_client(s3.settings(checksums=options.checksums))
    seen = capture_params(client)
    small, big = tmp_path / "small.bin", tmp_path / "big.bin"
    small.write_bytes(os.urandom(1000))
    big.write_bytes(os.urandom(5 * MiB + 1))  # two parts
    for source in (small, big):
        job = UploadJob(source=source, bucket=bucket, key="clip.mp4", options=options)
        upload(client, job, MemoryLedger(), threshold=5 * MiB, chunksize=5 * MiB, concurrency=2)
        head = client.head_object(Bucket=bucket, Key="clip.mp4")
        assert head["ContentType"] == "video/mp4"
        assert head["ServerSideEncryption"] == options.sse
        assert head.get("SSEKMSKeyId") == options.sse_kms_key_id
        assert head["Metadata"] == options.s3_arguments(key="k", file_name="f")["Metadata"]
        if options.acl == "public-read":
            grants = client.get_object_acl(Bucket=bucket, Key="clip.mp4")["Grants"]
            assert any(g["Grantee"].get("URI") == ALL_USERS for g in grants)
        assert head.get("StorageClass") == options.storage_class
        assert head.get("CacheControl") == options.cache_control
        assert head.get("ContentDisposition") == options.content_disposition
        tags = client.get_object_tagging(Bucket=bucket, Key="clip.mp4")["TagSet"]
        assert {t["Key"]: t["Value"] for t in tags} == dict(options.tags)

    [put], [create] = seen["PutObject"], seen["CreateMultipartUpload"]
    per_body = {"Body", "ContentMD5", "ChecksumSHA256"}  # what only the single PUT carries
    assert {k: v for k, v in put.items() if k not in per_body} == create
    assert create == {"Bucket": bucket, "Key": "clip.mp4"} | options.s3_arguments(
        key="clip.mp4", file_name=big.name
    )
