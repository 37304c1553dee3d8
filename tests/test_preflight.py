"""aws.upload with ``preflight: true`` and ``vodpush account check``: the bucket is checked
against S3 before anything is queued (the credentials, the bucket, the ACL against the
bucket's public access block and Object Ownership, a write that leaves nothing behind), and
each failure names its cause. Over HTTP against a live server wired as `vodpush serve`
wires it, against moto's S3 and STS (the shared process, and one enforcing IAM)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import free_port, run_cli, s3_client
from tests.iam import BUCKET, EXTERNAL_ID, LOCKED_ROLE, UPLOADER_ROLE, IamS3
from tests.s3server import MotoServer
from tests.test_worker import write_file
from tests.wire import STYLES, call, envelope, post
from vodpush.client import ApiError, Client
from vodpush.core.accounts import MASKED, S3Settings
from vodpush.server import attach_preflight
from vodpush.transfer.preflight import S3Preflight

ROLE = "arn:aws:iam::123456789012:role/vodpush-upload"


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only: nothing here differs by database (the store method the preflight uses,
    ``replayed``, is in the store contract on both)."""
    return f"sqlite:///{tmp_path / 'vodpush.db'}"


@pytest.fixture
def api(live_server, service) -> Any:
    """The live server with the preflight `vodpush serve` gives it."""
    attach_preflight(service)
    return live_server


@pytest.fixture
def path(sestore_root) -> str:
    rel, _ = write_file(sestore_root, "pre/flight.mp4", 2048)
    return rel


def upload(url: str, creds: Any, path: str, bucket: str, *, acl: str = "private", **extra: Any):
    return call(
        url,
        creds,
        "aws.upload",
        path=path,
        destination_path="videos/flight.mp4",
        bucket=bucket,
        acl=acl,
        **({"preflight": True} | extra),
    )


def queued(url: str, creds: Any) -> list[dict[str, Any]]:
    answer = call(url, creds, "aws.status")
    assert answer["status"] == "success", answer
    return answer["data"]


def refused(answer: dict[str, Any], message: str) -> None:
    assert answer["status"] == "failure", answer
    assert (answer["code"], answer["message"]) == ("0008", message)


def new_bucket(s3: MotoServer) -> str:
    name = f"pf-{uuid.uuid4().hex[:16]}"
    s3_client(s3).create_bucket(Bucket=name)
    return name


def block_public_acls(s3: MotoServer, bucket: str, setting: str) -> None:
    config = dict.fromkeys(
        ("BlockPublicAcls", "IgnorePublicAcls", "BlockPublicPolicy", "RestrictPublicBuckets"),
        False,
    )
    s3_client(s3).put_public_access_block(
        Bucket=bucket, PublicAccessBlockConfiguration={**config, setting: True}
    )


def disable_acls(s3: MotoServer, bucket: str) -> None:
    s3_client(s3).put_bucket_ownership_controls(
        Bucket=bucket, OwnershipControls={"Rules": [{"ObjectOwnership": "BucketOwnerEnforced"}]}
    )


# -- aws.upload with preflight ------------------------------------------------------------------


def test_a_passing_preflight_queues_as_usual_and_leaves_nothing_in_the_bucket(
    api, s3_account, s3: MotoServer, bucket: str, path: str
) -> None:
    answer = upload(api.url, s3_account, path, bucket, acl="public-read")
    assert answer["status"] == "success", answer
    assert answer["message"] == "Upload queued"
    assert answer["data"] == {"id": answer["data"]["id"], "preflight": "passed"}
    [record] = queued(api.url, s3_account)
    assert record["id"] == answer["data"]["id"] and record["state"] == "queued"
    # The write check started a multipart upload of the key and aborted it.
    client = s3_client(s3)
    assert "Uploads" not in client.list_multipart_uploads(Bucket=bucket)
    assert client.list_objects_v2(Bucket=bucket)["KeyCount"] == 0
    # Without the field the answer is exactly the reference one.
    answer = upload(api.url, s3_account, path, bucket, preflight=False)
    assert answer["data"] == {"id": answer["data"]["id"]}


def test_the_python_client_asks_for_a_preflight(api, s3_account, bucket: str, path: str) -> None:
    with Client(api.url + "/stable/", s3_account.cdn, s3_account.api_key,
                s3_account.api_secret) as client:  # fmt: skip
        request_id = client.upload(path, "v/ok.mp4", bucket=bucket, acl="private", preflight=True)
        assert client.get(request_id).state == "queued"
        with pytest.raises(ApiError) as caught:
            client.upload(path, "v/no.mp4", bucket="no-such-bucket-pf", acl="private",
                          preflight=True)  # fmt: skip
    assert caught.value.code == "0008"
    assert caught.value.message == "preflight: bucket 'no-such-bucket-pf' does not exist"


def test_a_missing_bucket_fails_the_preflight_and_queues_nothing(
    api, s3_account, path: str
) -> None:
    answer = upload(api.url, s3_account, path, "no-such-bucket-pf")
    refused(answer, "preflight: bucket 'no-such-bucket-pf' does not exist")
    assert queued(api.url, s3_account) == []


@pytest.mark.parametrize(
    ("setting", "why"),
    [
        ("BlockPublicAcls", "BlockPublicAcls"),
        ("IgnorePublicAcls", "IgnorePublicAcls (the object would not be public)"),
    ],
)
def test_public_read_blocked_by_the_public_access_block_fails_the_preflight(
    api, s3_account, s3: MotoServer, path: str, setting: str, why: str
) -> None:
    bucket = new_bucket(s3)
    block_public_acls(s3, bucket, setting)
    answer = upload(api.url, s3_account, path, bucket, acl="public-read")
    refused(
        answer,
        f"preflight: public-read is blocked: the bucket's public access block sets {why}; "
        "use acl private",
    )
    assert queued(api.url, s3_account) == []
    # A private upload is not concerned by it.
    assert upload(api.url, s3_account, path, bucket)["status"] == "success"


def test_public_read_on_a_bucket_with_acls_disabled_fails_the_preflight(
    api, s3_account, s3: MotoServer, path: str
) -> None:
    bucket = new_bucket(s3)
    disable_acls(s3, bucket)
    answer = upload(api.url, s3_account, path, bucket, acl="public-read")
    refused(
        answer,
        f"preflight: ACLs are disabled on bucket '{bucket}' (Object Ownership: "
        "BucketOwnerEnforced); use acl bucket-default or private",
    )
    assert queued(api.url, s3_account) == []
    # "private" sends no ACL header: such a bucket takes it.
    assert upload(api.url, s3_account, path, bucket)["status"] == "success"


def test_a_replayed_request_answers_its_first_id_without_a_second_preflight(
    api, s3_account, s3: MotoServer, path: str
) -> None:
    bucket = new_bucket(s3)
    payload = envelope(
        s3_account,
        "aws.upload",
        path=path,
        destination_path="videos/flight.mp4",
        bucket=bucket,
        acl="private",
        preflight=True,
    )
    text = STYLES["php"](payload, s3_account.api_secret)
    first = post(api.url, text).json()
    assert first["status"] == "success", first
    s3_client(s3).delete_bucket(Bucket=bucket)  # a second preflight would now fail
    again = post(api.url, text).json()
    assert again["status"] == "success", again
    assert again["data"]["id"] == first["data"]["id"]
    assert len(queued(api.url, s3_account)) == 1


def test_the_spellings_of_the_preflight_flag(api, s3_account, path) -> None:
    for value in (True, 1, "1", "true", "TRUE"):  # ask for one: the bucket is missing
        answer = upload(api.url, s3_account, path, "no-such-bucket-pf", preflight=value)
        assert answer.get("code") == "0008", (value, answer)
    for value in (False, 0, "0", "false", None):  # do not
        answer = upload(api.url, s3_account, path, "no-such-bucket-pf", preflight=value)
        assert answer["status"] == "success" and "preflight" not in answer["data"], answer
    for value in ("yes", 2, -1, 1.0, [], {}, "true\n"):
        answer = upload(api.url, s3_account, path, "no-such-bucket-pf", preflight=value)
        assert (answer.get("code"), answer["message"]) == (
            "0007",
            "invalid preflight: must be true or false",
        ), (value, answer)


def test_a_server_without_a_preflight_refuses_one(live_server, s3_account, bucket, path) -> None:
    answer = upload(live_server.url, s3_account, path, bucket)
    refused(answer, "preflight: not available on this server")
    assert queued(live_server.url, s3_account) == []


def test_sts_unreachable_fails_the_preflight_as_temporary(
    api, service, account, s3: MotoServer, bucket, path, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{free_port()}")  # closed
    service.accounts.set_s3(account.api_key, s3.settings(endpoint_url=None, role_arn=ROLE))
    answer = upload(api.url, account, path, bucket)
    refused(
        answer,
        f"preflight: could not assume role {ROLE}: STS could not be reached "
        "(EndpointConnectionError); try again",
    )
    # With STS back the same request passes, assuming the role as its account.
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3.url)
    assert upload(api.url, account, path, bucket)["status"] == "success"


class Silent:
    """A loopback server that takes connections and never answers (S3 hanging)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = threading.Event()
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        for sock in [*self.conns, self.sock]:
            sock.close()


@pytest.fixture
def silent() -> Iterator[Silent]:
    server = Silent()
    yield server
    server.close()


def test_a_hanging_s3_is_given_up_in_time_and_holds_no_more_than_its_slot(
    live_server, service, account, silent: Silent, path
) -> None:
    service.preflight = S3Preflight(timeout=1.5, concurrency=1)
    service.accounts.set_s3(
        account.api_key,
        S3Settings(
            endpoint_url=silent.url, region="us-east-1", access_key_id="a", secret_access_key="b"
        ),
    )
    first: dict[str, Any] = {}

    def hanging() -> None:
        started = time.monotonic()
        first["answer"] = upload(live_server.url, account, path, "some-bucket")
        first["seconds"] = time.monotonic() - started

    thread = threading.Thread(target=hanging)
    thread.start()
    assert silent.accepted.wait(5)
    # Its slot is taken: a second preflight is told to come back, at once.
    started = time.monotonic()
    busy = upload(live_server.url, account, path, "some-bucket")
    assert time.monotonic() - started < 1.0
    refused(busy, "preflight: too many preflights are running; try again in a few seconds")
    thread.join(10)
    refused(first["answer"], "preflight: S3 did not answer within 1.5 s; try again")
    assert 1.5 <= first["seconds"] < 3.0
    assert queued(live_server.url, account) == []


# -- against S3 enforcing IAM --------------------------------------------------------------------


def test_keys_s3_does_not_know_fail_the_preflight(api, service, account, iam_s3, path) -> None:
    service.accounts.set_s3(account.api_key, iam_s3.settings(("AKIAUNKNOWN0000", "nope")))
    answer = upload(api.url, account, path, BUCKET)
    refused(answer, "preflight: credentials rejected: InvalidAccessKeyId")
    assert queued(api.url, account) == []


def test_a_role_sts_refuses_fails_the_preflight_naming_it(
    api, service, account, iam_s3, path
) -> None:
    service.accounts.set_s3(account.api_key, iam_s3.settings(iam_s3.service, role_arn=LOCKED_ROLE))
    answer = upload(api.url, account, path, BUCKET)
    refused(
        answer,
        f"preflight: could not assume role {LOCKED_ROLE}: AccessDenied (the role's trust "
        "policy does not let this service assume it, or the external id differs)",
    )


def test_credentials_that_may_not_write_fail_the_preflight(
    api, service, account, iam_s3, path
) -> None:
    service.accounts.set_s3(account.api_key, iam_s3.settings(iam_s3.reader))
    answer = upload(api.url, account, path, BUCKET)
    refused(
        answer,
        f"preflight: cannot write 'videos/flight.mp4' to bucket '{BUCKET}': AccessDenied "
        "(the credentials need s3:PutObject on it)",
    )


def test_an_assumable_role_passes_the_preflight(api, service, account, iam_s3, path) -> None:
    service.accounts.set_s3(
        account.api_key,
        iam_s3.settings(iam_s3.service, role_arn=UPLOADER_ROLE, external_id=EXTERNAL_ID),
    )
    answer = upload(api.url, account, path, BUCKET)
    assert answer["status"] == "success", answer
    assert len(queued(api.url, account)) == 1


# -- the operator CLI -------------------------------------------------------------------------


def test_set_s3_takes_a_role_and_show_masks_the_external_id(cli_env, account, capsys) -> None:
    code, out, err = run_cli(
        capsys,
        "account", "set-s3", account.api_key,
        "--role-arn", ROLE, "--external-id", "customer-ext-9876",
    )  # fmt: skip
    assert code == 0, err
    shown = json.loads(out)
    assert shown["s3_role_arn"] == ROLE
    assert shown["s3_external_id"] == MASKED + "9876"
    code, out, _ = run_cli(capsys, "account", "show", str(account.id))
    assert code == 0 and json.loads(out) == shown
    assert "customer-ext" not in out

    code, _, err = run_cli(
        capsys, "account", "set-s3", account.api_key, "--role-arn", "arn:aws:iam::1:role/x"
    )
    assert code == 1 and err.startswith("error: role ARN must look like arn:aws:iam::")
    code, _, err = run_cli(capsys, "account", "set-s3", account.api_key, "--external-id", "xy")
    assert (code, err) == (1, "error: an external id goes with a role ARN\n")
    code, _, err = run_cli(capsys, "account", "show", "no-such-key")
    assert (code, err) == (1, "error: no such account: 'no-such-key'\n")


def check(capsys, account: Any, *args: str) -> tuple[int, list[str]]:
    code, out, err = run_cli(capsys, "account", "check", str(account.id), *args)
    assert err == ""
    return code, out.splitlines()


def test_account_check_reports_each_step(cli_env, service, account, s3, capsys) -> None:
    service.accounts.set_s3(account.api_key, s3.settings())
    good, missing, blocked, owned = (
        new_bucket(s3),
        "pf-missing-bucket",
        new_bucket(s3),
        new_bucket(s3),
    )
    block_public_acls(s3, blocked, "BlockPublicAcls")
    disable_acls(s3, owned)

    code, lines = check(capsys, account, "--bucket", good, "--acl", "public-read")
    assert code == 0
    assert lines[0] == (
        f"account {account.id} (158/jb): key testing; endpoint {s3.url}, region us-east-1"
    )
    assert lines[1:] == [
        f"bucket '{good}' (key '.vodpush-preflight/check', acl public-read): passed",
        "  ok       allowed      the account may write to this bucket",
        "  ok       credentials  S3 accepts the account's keys",
        f"  ok       bucket       bucket '{good}' exists",
        "  ok       acl          acl public-read is allowed by the bucket's settings",
        f"  ok       writable     bucket '{good}' takes '.vodpush-preflight/check' (a multipart "
        "upload was started and aborted)",
    ]
    assert "Uploads" not in s3_client(s3).list_multipart_uploads(Bucket=good)

    code, lines = check(capsys, account, "--bucket", missing, "--bucket", blocked,
                        "--bucket", owned, "--acl", "public-read", "--key", "v/x.mp4")  # fmt: skip
    assert code == 1
    assert lines[1] == f"bucket '{missing}' (key 'v/x.mp4', acl public-read): FAILED"
    assert f"  failed   bucket       bucket '{missing}' does not exist" in lines
    assert "  skipped  writable     not reached" in lines
    assert (
        "  failed   acl          public-read is blocked: the bucket's public access block "
        "sets BlockPublicAcls; use acl private"
    ) in lines
    assert (
        f"  failed   acl          ACLs are disabled on bucket '{owned}' (Object Ownership: "
        "BucketOwnerEnforced); use acl bucket-default or private"
    ) in lines
    # bucket-default (no ACL header) is never blocked by either.
    code, lines = check(capsys, account, "--bucket", blocked, "--bucket", owned,
                        "--acl", "bucket-default")  # fmt: skip
    assert code == 0, lines


def test_account_check_defaults_to_the_named_buckets_and_says_when_there_are_none(
    cli_env, service, make_account, s3, capsys
) -> None:
    creds = make_account(cdn=159, username="ann")
    service.accounts.set_s3(creds.api_key, s3.settings())
    code, _, err = run_cli(capsys, "account", "check", creds.api_key)
    assert code == 1 and "name the bucket(s) to check with --bucket" in err
    named = new_bucket(s3)
    service.accounts.disallow_buckets(creds.api_key, ["*"])
    service.accounts.allow_buckets(creds.api_key, [named, "other-*"])
    code, lines = check(capsys, creds, "--json")
    report = json.loads("\n".join(lines))
    assert code == 0 and report["passed"] is True
    assert [b["bucket"] for b in report["buckets"]] == [named]
    # A bucket off the account's list fails the check, whatever S3 would say.
    code, lines = check(capsys, creds, "--bucket", new_bucket(s3))
    assert code == 1
    assert lines[2].startswith("  failed   allowed      bucket '")


def test_account_check_names_rejected_keys_and_a_refused_role(
    cli_env, service, account, iam_s3: IamS3, capsys
) -> None:
    service.accounts.set_s3(account.api_key, iam_s3.settings(("AKIAUNKNOWN0000", "nope")))
    code, lines = check(capsys, account, "--bucket", BUCKET)
    assert code == 1
    assert "  failed   credentials  credentials rejected: InvalidAccessKeyId" in lines

    # Keys S3 knows that may do nothing in S3: accepted, and the write check fails.
    service.accounts.set_s3(account.api_key, iam_s3.settings(iam_s3.service))
    code, lines = check(capsys, account, "--bucket", BUCKET, "--key", "v/k.mp4")
    assert code == 1
    assert lines[3:] == [
        "  ok       credentials  S3 accepts the account's keys (ListBuckets: AccessDenied; "
        "uploads do not need it)",
        "  unknown  bucket       HeadBucket was refused (403): the credentials may lack "
        "s3:ListBucket, which uploads do not need; the write check decides",
        "  skipped  acl          acl private sends no ACL: nothing to check",
        f"  failed   writable     cannot write 'v/k.mp4' to bucket '{BUCKET}': AccessDenied "
        "(the credentials need s3:PutObject on it)",
    ]

    service.accounts.set_s3(account.api_key, iam_s3.settings(iam_s3.service, role_arn=LOCKED_ROLE))
    code, lines = check(capsys, account, "--bucket", BUCKET)
    assert code == 1
    assert lines[0].endswith(f"role {LOCKED_ROLE}, assumed with key {iam_s3.service[0]}; "
                             f"endpoint {iam_s3.url}, region us-east-1")  # fmt: skip
    assert lines[3].startswith(
        f"  failed   credentials  could not assume role {LOCKED_ROLE}: AccessDenied"
    )

    service.accounts.set_s3(
        account.api_key,
        iam_s3.settings(iam_s3.service, role_arn=UPLOADER_ROLE, external_id=EXTERNAL_ID),
    )
    code, lines = check(capsys, account, "--bucket", BUCKET)
    assert code == 0, lines
    assert (
        f"  ok       credentials  role {UPLOADER_ROLE} assumed (session vodpush-{account.id})"
        in lines
    )
