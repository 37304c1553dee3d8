"""Assumed roles: an account's S3 settings name a role ARN (and external id); its uploads
sign with the role's temporary credentials from STS, refreshed ahead of expiry, and a role
that cannot be assumed fails the upload with a cause that names it: transient when STS was
not reached, permanent when STS refused. Against moto's STS and S3 (the shared process,
and one enforcing IAM: tests/iam.py), through a recording proxy where the test needs to
see what was sent; the worker end to end over HTTP."""

from __future__ import annotations

import dataclasses
import datetime as dt
import re
import urllib.parse
from typing import Any

import pytest

from tests.conftest import free_port, s3_client
from tests.iam import BUCKET, EXTERNAL_ID, LOCKED_ROLE, UPLOADER_ROLE, IamS3
from tests.s3server import Intercept, MotoServer, TcpProxy
from tests.test_worker import run_worker, status_of, write_file
from tests.wire import call
from vodpush.config import Settings
from vodpush.core.accounts import (
    MASKED,
    AccountError,
    AccountRecord,
    S3Settings,
    check_role,
    check_s3,
)
from vodpush.crypto import generate_key
from vodpush.transfer.clients import Built, ClientCache
from vodpush.transfer.errors import RoleUnavailable, UploadError, classify, s3_call
from vodpush.transfer.roles import role_credentials
from vodpush.transfer.s3client import make_s3_client
from vodpush.worker.clients import AccountClients

ROLE = "arn:aws:iam::123456789012:role/vodpush-upload"


@pytest.fixture
def database_url(tmp_path) -> str:
    """SQLite only: roles are the S3 side's business; the stores keep the settings on
    both databases as the store contract shows."""
    return f"sqlite:///{tmp_path / 'vodpush.db'}"


# -- what an operator may set (unit) --------------------------------------------------------


@pytest.mark.parametrize(
    "arn",
    [
        "arn:aws:iam::123456789012:role/x",
        "arn:aws:iam::123456789012:role/service-role/deep/path/Name+=,.@-_",
        "arn:aws-cn:iam::123456789012:role/x",
        "arn:aws-us-gov:iam::123456789012:role/x",
    ],
)
def test_role_arns_sts_takes_are_accepted(arn: str) -> None:
    check_role(arn, "external-id")


@pytest.mark.parametrize(
    "arn",
    [
        "",
        "arn:aws:iam::123456789012:role/",
        "arn:aws:iam::12345678901:role/x",  # 11 digits
        "arn:aws:iam::123456789012:user/x",
        "arn:aws:s3:::bucket",
        "arn:aws:iam::123456789012:role/x\n",
        "arn:aws:iam::123456789012:role/a b",
        "arn:aws:iam::123456789012:role/" + "x" * 65,  # a name of at most 64
        "arn:aws:iam::123456789012:role/" + "p/" * 1100 + "x",  # over 2048 characters
        " arn:aws:iam::123456789012:role/x",
    ],
)
def test_malformed_role_arns_are_refused(arn: str) -> None:
    with pytest.raises(AccountError, match="role ARN must look like"):
        check_role(arn, None)


@pytest.mark.parametrize(
    "external_id", ["q", "q" * 1225, "has space", "new\nline", "semi;colon", "é" * 4]
)
def test_malformed_external_ids_are_refused_without_echoing_them(external_id: str) -> None:
    with pytest.raises(AccountError, match="external id must be") as refused:
        check_role(ROLE, external_id)
    assert external_id not in str(refused.value)


def test_external_ids_sts_takes_are_accepted_and_need_a_role() -> None:
    check_role(ROLE, "ab")
    check_role(ROLE, "Ab0+=,.@:/-_" * 102)  # 1224 characters
    with pytest.raises(AccountError, match="goes with a role ARN"):
        check_s3(S3Settings(external_id="lonely-id"))


def test_the_external_id_is_masked_when_shown() -> None:
    s3 = S3Settings(role_arn=ROLE, external_id="customer-secretish-0123")
    record = AccountRecord(
        id=1,
        cdn=158,
        username="jb",
        api_key="k",
        enabled=True,
        api_secret_enc="x",
        s3=s3,
        created_at="2026-01-01 00:00:00",
    )
    shown = record.public()
    assert shown["s3_role_arn"] == ROLE
    assert shown["s3_external_id"] == MASKED + "0123"
    assert "secretish" not in repr(s3)
    # A role is an identity of its own: with an empty bucket list it may use what it
    # reaches, like an account with keys (the operator's credentials reach nothing by it).
    assert record.may_use_bucket("any-bucket") is None
    assert dataclasses.replace(record, s3=S3Settings()).may_use_bucket("any-bucket")


# -- clients (unit: building a client opens no socket) ------------------------------------


def _account(account_id: int, s3: S3Settings) -> AccountRecord:
    return AccountRecord(
        id=account_id,
        cdn=158,
        username=f"u{account_id}",
        api_key=f"k{account_id}",
        enabled=True,
        api_secret_enc="x",
        s3=s3,
        created_at="2026-01-01 00:00:00",
    )


def test_each_account_has_its_own_role_session_and_others_still_share(tmp_path) -> None:
    settings = Settings(
        database_url="sqlite://",
        secret_key=generate_key(),
        secret_key_file=tmp_path / "k",
    )
    clients = AccountClients(settings)
    keys = S3Settings(
        endpoint_url="http://127.0.0.1:9", access_key_id="AKIA1", secret_access_key="s"
    )
    role = dataclasses.replace(keys, role_arn=ROLE, external_id="ext-1")
    assert clients(_account(1, keys)) is clients(_account(2, keys))
    one, two = clients(_account(1, role)), clients(_account(2, role))
    assert one is not two and clients(_account(1, role)) is one
    assert clients(_account(1, dataclasses.replace(role, external_id="ext-2"))) is not one
    assert clients.cache.builds == 4


def test_the_cache_hands_the_session_name_to_the_builder_only_with_a_role() -> None:
    seen: list[str | None] = []

    def build(s3: S3Settings, session_name: str | None) -> Built[object]:
        seen.append(session_name)
        return Built(object())

    cache: ClientCache[object] = ClientCache(build, max_size=4, ttl=900, refresh_margin=60)
    cache.client(S3Settings(role_arn=ROLE), session_name="vodpush-9")
    cache.client(S3Settings(), session_name="vodpush-9")
    assert seen == ["vodpush-9", None]
    assert "vodpush-9" in repr(cache.key(S3Settings(role_arn=ROLE), "vodpush-9"))


def test_a_role_failure_is_classified_by_what_it_says() -> None:
    refused = RoleUnavailable(
        message="could not assume role r: AccessDenied",
        transient=False,
        code="AccessDenied",
        detail="User: arn:... is not authorized",
    )
    err = classify(refused)
    assert (err.message, err.transient, err.code) == (refused.message, False, "AccessDenied")
    assert err.detail == "User: arn:... is not authorized"

    def raising(**_: Any) -> dict[str, Any]:
        raise RoleUnavailable(
            message="could not assume role r: STS error Throttling",
            transient=True,
            code="Throttling",
        )

    with pytest.raises(UploadError) as caught:
        s3_call(raising)
    assert caught.value.transient and caught.value.code == "Throttling"


# -- against moto's STS and S3 ----------------------------------------------------------------


class RecordingProxy(TcpProxy):
    """A TcpProxy that keeps every chunk clients send (small test traffic only)."""

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self.sent: list[bytes] = []
        # A rule that never matches keeps _take() called for every chunk.
        self.intercept(Intercept(marker=b"\x00never\x00"))

    def _take(self, data: bytes) -> Intercept | None:
        self.sent.append(data)
        return super()._take(data)

    def assume_role_calls(self) -> list[dict[str, str]]:
        calls = []
        for chunk in self.sent:
            if b"Action=AssumeRole" in chunk:
                body = chunk.split(b"\r\n\r\n", 1)[-1].decode()
                calls.append(dict(urllib.parse.parse_qsl(body)))
        return calls

    def s3_key_ids(self) -> list[str]:
        """The access key id of each S3 request (object PUTs), in order."""
        found = []
        for chunk in self.sent:
            if chunk.startswith(b"PUT /"):
                match = re.search(rb"Credential=([A-Z0-9]+)/[^/]+/[^/]+/s3/", chunk)
                assert match, chunk[:300]
                found.append(match.group(1).decode())
        return found


def sts_error(status: int, code: str) -> bytes:
    body = (
        '<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">'
        f"<Error><Type>Receiver</Type><Code>{code}</Code><Message>try later</Message></Error>"
        "<RequestId>r-1</RequestId></ErrorResponse>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} Oops\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def sts_fails(proxy: TcpProxy, times: int = 5) -> list[Intercept]:
    """The next ``times`` STS requests through ``proxy`` are answered 503 in STS's place."""
    answer = sts_error(503, "Unavailable")
    return [
        proxy.intercept(Intercept(marker=b"POST / HTTP/1.1", answer=answer)) for _ in range(times)
    ]


@pytest.fixture
def proxy(s3: MotoServer):
    proxy = RecordingProxy(s3.port).start()
    yield proxy
    proxy.stop()


def test_the_role_is_assumed_as_configured_and_signs_the_s3_requests(
    s3: MotoServer, bucket: str, proxy: RecordingProxy
) -> None:
    settings = s3.settings(endpoint_url=proxy.url, role_arn=ROLE, external_id="ext-1234")
    client = make_s3_client(settings, session_name="vodpush-7")
    assert proxy.assume_role_calls() == []  # nothing asked before the first request
    client.put_object(Bucket=bucket, Key="a", Body=b"one")
    client.put_object(Bucket=bucket, Key="b", Body=b"two")
    [assumed] = proxy.assume_role_calls()  # once: the credentials are kept
    assert assumed == {
        "Action": "AssumeRole",
        "Version": "2011-06-15",
        "RoleArn": ROLE,
        "RoleSessionName": "vodpush-7",
        "ExternalId": "ext-1234",
        "DurationSeconds": "3600",
    }
    # STS is called with the account's own keys; S3 with the role's temporary ones.
    sts_heads = [c for c in proxy.sent if c.startswith(b"POST / ")]
    assert sts_heads and all(b"Credential=testing/" in c for c in sts_heads)
    key_ids = proxy.s3_key_ids()
    assert len(key_ids) == 2 and len(set(key_ids)) == 1
    assert key_ids[0].startswith("ASIA")  # moto's session credentials, as AWS's
    assert s3_client(s3).get_object(Bucket=bucket, Key="b")["Body"].read() == b"two"


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


def test_credentials_are_refreshed_ahead_of_expiry_and_a_failed_refresh_is_classified(
    s3: MotoServer, bucket: str, proxy: RecordingProxy
) -> None:
    # A 900 s session (STS's minimum): refreshed from 225 s before expiry (advisory: one
    # request tries, the rest go on with what they have), required from 150 s before.
    clock = Clock()
    start = clock.now
    settings = s3.settings(endpoint_url=proxy.url, role_arn=ROLE)
    credentials = role_credentials(
        settings, session_name="vodpush-3", duration=900, max_attempts=1, time_fetcher=clock
    )
    client = make_s3_client(settings, max_attempts=1, credentials=credentials)
    client.put_object(Bucket=bucket, Key="k", Body=b"1")
    clock.now = start + dt.timedelta(seconds=600)  # 300 s left: no refresh yet
    client.put_object(Bucket=bucket, Key="k", Body=b"2")
    assert len(proxy.assume_role_calls()) == 1

    clock.now = start + dt.timedelta(seconds=700)  # 200 s left: advisory refresh
    client.put_object(Bucket=bucket, Key="k", Body=b"3")
    assert len(proxy.assume_role_calls()) == 2
    first, second, third = proxy.s3_key_ids()
    assert first == second != third and third.startswith("ASIA")

    # STS fails while the credentials are still good for a while: the request goes on
    # with them (botocore may look at them, and try STS, more than once a request).
    sts_down = sts_fails(proxy)
    clock.now = start + dt.timedelta(seconds=730)
    client.put_object(Bucket=bucket, Key="k", Body=b"4")
    assert sts_down[0].done.is_set()
    assert proxy.s3_key_ids()[-1] == third

    # Inside the mandatory window a refresh must succeed: the S3 call fails, transient,
    # naming the role; nothing reaches S3.
    sts_fails(proxy)
    clock.now = start + dt.timedelta(seconds=1000)
    puts_before = len(proxy.s3_key_ids())
    with pytest.raises(RoleUnavailable) as caught:
        client.put_object(Bucket=bucket, Key="k", Body=b"5")
    err = classify(caught.value)
    assert err.transient and err.code == "Unavailable"
    assert err.message == f"could not assume role {ROLE}: STS error Unavailable"
    assert len(proxy.s3_key_ids()) == puts_before
    assert s3_client(s3).get_object(Bucket=bucket, Key="k")["Body"].read() == b"4"


def test_sts_unreachable_is_transient_and_sts_follows_the_environment(
    s3: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No endpoint on the account: S3 and STS go where boto3's environment says.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{free_port()}")  # closed
    settings = s3.settings(endpoint_url=None, role_arn=ROLE)
    client = make_s3_client(settings, max_attempts=1, connect_timeout=2)
    with pytest.raises(RoleUnavailable) as caught:
        client.put_object(Bucket=bucket, Key="k", Body=b"x")
    err = classify(caught.value)
    assert err.transient and err.code == "EndpointConnectionError"
    assert err.message == (
        f"could not assume role {ROLE}: STS could not be reached (EndpointConnectionError)"
    )
    assert "127.0.0.1" not in err.message  # the operator's endpoints stay in the log
    # With STS back (the environment pointing at moto), the same settings work.
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", s3.url)
    make_s3_client(settings, max_attempts=1).put_object(Bucket=bucket, Key="k", Body=b"x")


@pytest.mark.parametrize(
    ("role", "external_id"),
    # (moto lets a missing external id through a trust policy's condition; AWS does not.)
    [(LOCKED_ROLE, None), (UPLOADER_ROLE, "not-the-right-one")],
)
def test_sts_refusing_the_role_is_permanent_and_names_it(
    iam_s3: IamS3, role: str, external_id: str | None
) -> None:
    settings = iam_s3.settings(iam_s3.service, role_arn=role, external_id=external_id)
    client = make_s3_client(settings, max_attempts=1)
    with pytest.raises(RoleUnavailable) as caught:
        client.put_object(Bucket=BUCKET, Key="k", Body=b"x")
    err = classify(caught.value)
    assert not err.transient and err.code == "AccessDenied"
    assert err.message.startswith(f"could not assume role {role}: AccessDenied (")
    # STS's own text (it names the principal of the service's keys) is for the log only.
    assert "vodpush" not in err.message and "user/" in (err.detail or "")


# -- the worker, end to end over HTTP ---------------------------------------------------------


def _queue(live_server: Any, creds: Any, sestore_root: Any, name: str, bucket: str) -> int:
    path, _ = write_file(sestore_root, f"role/{name}.mp4", 1000 + len(name))
    answer = call(
        live_server.url,
        creds,
        "aws.upload",
        path=path,
        destination_path=f"role/{name}.mp4",
        bucket=bucket,
        acl="private",
    )
    assert answer["status"] == "success", answer
    return int(answer["data"]["id"])


def test_the_worker_uploads_with_the_role_it_assumes(
    live_server, service, account, iam_s3: IamS3, sestore_root
) -> None:
    # The account's keys have no S3 right at all (tests/iam.py): only the role has.
    service.accounts.set_s3(
        account.api_key,
        iam_s3.settings(iam_s3.service, role_arn=UPLOADER_ROLE, external_id=EXTERNAL_ID),
    )
    with_role = _queue(live_server, account, sestore_root, "with-role", BUCKET)
    run_worker(service)
    record = status_of(live_server.url, account, with_role)
    assert record["state"] == "succeeded", record
    stored = iam_s3.client().get_object(Bucket=BUCKET, Key="role/with-role.mp4")["Body"].read()
    assert stored == (sestore_root / "sestore1/jb/role/with-role.mp4").read_bytes()

    # The same keys without the role: S3 refuses them (the role made the difference).
    service.accounts.set_s3(account.api_key, iam_s3.settings(iam_s3.service))
    without = _queue(live_server, account, sestore_root, "without-role", BUCKET)
    run_worker(service)
    record = status_of(live_server.url, account, without)
    assert record["state"] == "failed" and record["error_code"] == "AccessDenied", record


def test_the_worker_fails_a_role_sts_refuses_at_once_naming_it(
    live_server, service, account, iam_s3: IamS3, sestore_root
) -> None:
    service.accounts.set_s3(account.api_key, iam_s3.settings(iam_s3.service, role_arn=LOCKED_ROLE))
    request_id = _queue(live_server, account, sestore_root, "locked", BUCKET)
    run_worker(service)
    record = status_of(live_server.url, account, request_id)
    assert record["state"] == "failed", record
    assert record["attempts"] == 1  # permanent: not retried
    assert record["error_code"] == "AccessDenied"
    assert record["message"].startswith(
        f"Upload failed: could not assume role {LOCKED_ROLE}: AccessDenied ("
    )


def test_the_worker_retries_while_sts_is_unreachable_then_fails_naming_the_role(
    live_server, service, account, s3: MotoServer, bucket, sestore_root, monkeypatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL_STS", f"http://127.0.0.1:{free_port()}")  # closed
    service.accounts.set_s3(account.api_key, s3.settings(endpoint_url=None, role_arn=ROLE))
    request_id = _queue(live_server, account, sestore_root, "sts-down", bucket)
    run_worker(service)
    record = status_of(live_server.url, account, request_id)
    assert record["state"] == "failed", record
    assert record["attempts"] == service.settings.max_attempts  # each one retried
    assert record["error_code"] == "EndpointConnectionError"
    assert record["message"] == (
        f"Upload failed: could not assume role {ROLE}: STS could not be reached "
        "(EndpointConnectionError)"
    )
