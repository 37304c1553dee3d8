"""Standard Webhooks signing: interoperability with the reference ``standardwebhooks``
package in both directions, and every way verification must fail."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from datetime import UTC, datetime

import pytest
from standardwebhooks.webhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError as RefVerificationError

from vodpush.webhooks import (
    HEADER_ID,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    WebhookVerificationError,
    new_message_id,
    sign,
    standard_webhooks_secret,
    verify,
)

SECRET = "S3CR3T-api-secret/with+odd=chars"
BODY = json.dumps({"id": 7, "message": "Successfully Uploaded to AWS", "city": "Zürich"}).encode()


def test_standard_webhooks_secret_wraps_utf8_bytes_of_the_api_secret() -> None:
    wrapped = standard_webhooks_secret("héllo")
    assert wrapped.startswith("whsec_")
    assert base64.b64decode(wrapped.removeprefix("whsec_")) == "héllo".encode()


def test_signature_is_hmac_sha256_of_id_timestamp_body() -> None:
    headers = sign(SECRET, "msg_1", 1_700_000_000, BODY)
    digest = hmac.new(SECRET.encode(), b"msg_1.1700000000." + BODY, hashlib.sha256).digest()
    assert headers == {
        HEADER_ID: "msg_1",
        HEADER_TIMESTAMP: "1700000000",
        HEADER_SIGNATURE: "v1," + base64.b64encode(digest).decode(),
    }


def test_fractional_timestamp_is_floored_to_unix_seconds() -> None:
    assert sign(SECRET, "msg_1", 1_700_000_000.9, BODY)[HEADER_TIMESTAMP] == "1700000000"


def test_reference_library_verifies_our_signature() -> None:
    headers = sign(SECRET, new_message_id(), time.time(), BODY)
    payload = Webhook(standard_webhooks_secret(SECRET)).verify(BODY, headers)
    assert payload["city"] == "Zürich"


def test_we_verify_the_reference_library_signature() -> None:
    reference = Webhook(standard_webhooks_secret(SECRET))
    now = datetime.now(UTC).replace(microsecond=0)
    headers = {
        "webhook-id": "msg_ref",
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": reference.sign("msg_ref", now, BODY.decode()),
    }
    verify(SECRET, headers, BODY)


def test_verify_accepts_own_signature_and_ignores_header_case() -> None:
    headers = sign(SECRET, "msg_case", 1_700_000_000, BODY)
    upper = {name.upper(): value for name, value in headers.items()}
    verify(SECRET, upper, BODY, now=1_700_000_010)


def test_message_ids_are_unique_and_prefixed() -> None:
    ids = {new_message_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(i.startswith("msg_") for i in ids)


def test_tampered_body_fails_both_verifiers() -> None:
    headers = sign(SECRET, "msg_t", time.time(), BODY)
    tampered = BODY.replace(b"7", b"8")
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SECRET, headers, tampered)
    with pytest.raises(RefVerificationError):
        Webhook(standard_webhooks_secret(SECRET)).verify(tampered, headers)


def test_wrong_secret_fails_both_verifiers() -> None:
    headers = sign(SECRET, "msg_w", time.time(), BODY)
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify("another-secret", headers, BODY)
    with pytest.raises(RefVerificationError):
        Webhook(standard_webhooks_secret("another-secret")).verify(BODY, headers)


def test_old_timestamp_fails_both_verifiers() -> None:
    headers = sign(SECRET, "msg_o", time.time() - 3600, BODY)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers, BODY)
    with pytest.raises(RefVerificationError, match="too old"):
        Webhook(standard_webhooks_secret(SECRET)).verify(BODY, headers)


@pytest.mark.parametrize(
    ("sent_at", "now", "error"),
    [(1000, 1301, "too old"), (1301, 1000, "too new")],
)
def test_timestamp_outside_tolerance(sent_at: int, now: int, error: str) -> None:
    headers = sign(SECRET, "msg_x", sent_at, BODY)
    with pytest.raises(WebhookVerificationError, match=error):
        verify(SECRET, headers, BODY, now=now)


def test_timestamp_at_edge_of_tolerance_is_accepted() -> None:
    headers = sign(SECRET, "msg_x", 1000, BODY)
    verify(SECRET, headers, BODY, now=1300)
    verify(SECRET, headers, BODY, now=700)
    verify(SECRET, headers, BODY, now=1010, tolerance=10)
    with pytest.raises(WebhookVerificationError, match="too old"):
        verify(SECRET, headers, BODY, now=1011, tolerance=10)


@pytest.mark.parametrize("missing", [HEADER_ID, HEADER_TIMESTAMP, HEADER_SIGNATURE])
def test_missing_header_is_named(missing: str) -> None:
    headers = sign(SECRET, "msg_m", 1000, BODY)
    del headers[missing]
    with pytest.raises(WebhookVerificationError, match=f"missing header.*{missing}"):
        verify(SECRET, headers, BODY, now=1000)


@pytest.mark.parametrize("bad", ["abc", "1e9", "-5", "12.5", ""])
def test_malformed_timestamp_is_refused(bad: str) -> None:
    headers = sign(SECRET, "msg_m", 1000, BODY)
    headers[HEADER_TIMESTAMP] = bad
    with pytest.raises(WebhookVerificationError):
        verify(SECRET, headers, BODY, now=1000)


def test_any_of_several_signatures_may_match() -> None:
    headers = sign(SECRET, "msg_s", 1000, BODY)
    good = headers[HEADER_SIGNATURE]
    other = sign("old-secret", "msg_s", 1000, BODY)[HEADER_SIGNATURE]
    headers[HEADER_SIGNATURE] = f"{other} v1a,c2lnbmF0dXJl garbage v1,!!notbase64!! {good}"
    verify(SECRET, headers, BODY, now=1000)


def test_malformed_signature_entries_fail_cleanly() -> None:
    headers = sign(SECRET, "msg_s", 1000, BODY)
    good = headers[HEADER_SIGNATURE].split(",", 1)[1]
    # The right digest under another version label must not count.
    headers[HEADER_SIGNATURE] = f"v2,{good} garbage v1,!!! v1"
    with pytest.raises(WebhookVerificationError, match="no matching signature"):
        verify(SECRET, headers, BODY, now=1000)


def test_signature_covers_id_and_timestamp() -> None:
    headers = sign(SECRET, "msg_a", 1000, BODY)
    for name, value in [(HEADER_ID, "msg_b"), (HEADER_TIMESTAMP, "1001")]:
        changed = {**headers, name: value}
        with pytest.raises(WebhookVerificationError, match="no matching signature"):
            verify(SECRET, changed, BODY, now=1000)


def test_empty_secret_and_bad_ids_are_refused_when_signing() -> None:
    with pytest.raises(ValueError, match="empty"):
        sign("", "msg_1", 1000, BODY)
    with pytest.raises(ValueError, match="empty"):
        standard_webhooks_secret("")
    for bad_id in ["", "msg 1", "msg\r\nX-Evil: 1"]:
        with pytest.raises(ValueError, match="msg_id"):
            sign(SECRET, bad_id, 1000, BODY)
    with pytest.raises(ValueError, match="timestamp"):
        sign(SECRET, "msg_1", float("nan"), BODY)
