"""Unit tests of the signing module and authentication, without a server."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from tests.wire import STYLES
from vodpush.protocol.auth import authenticate
from vodpush.protocol.envelope import ApiError
from vodpush.protocol.signing import (
    MalformedRequest,
    MissingSignature,
    compute_signature,
    sign_request,
    split_signed_request,
    verify,
)

SECRET = "8fc8c48da81e6a2a06a9556379bf798af508dc0792497c678b4c3532ba8b637f"
PAYLOAD = {
    "command": "aws.upload",
    "api_key": "APX4GKLM0RKQLSP2FBO1ROPKSSW47DZE",
    "timestamp": 1_700_000_000,
    "cdn": 158,
    "metadata": {"title": "Café / Crème", "emoji": "🎬", "quote": 'say "hi"\\'},
}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_client_style_verifies_from_the_raw_text(style):
    signed = split_signed_request(STYLES[style](PAYLOAD, SECRET))
    assert signed.payload == PAYLOAD
    assert signed.signed_text is not None
    assert verify(signed, SECRET)
    assert not verify(signed, "0" * 64)


def test_signature_not_last_falls_back_to_reencodings():
    text = json.dumps(PAYLOAD, separators=(",", ":"), ensure_ascii=False)
    sig = compute_signature(SECRET, text)
    reordered = json.dumps({"signature": sig, **PAYLOAD}, ensure_ascii=False)
    signed = split_signed_request(reordered)
    assert signed.signed_text is None
    assert verify(signed, SECRET)


def test_unknown_encoding_does_not_verify():
    text = json.dumps(PAYLOAD, indent=2)  # signed as pretty-printed: no client does this
    sig = compute_signature(SECRET, text)
    sent = json.dumps({**PAYLOAD, "signature": sig})
    assert not verify(split_signed_request(sent), SECRET)


def test_sign_request_matches_the_php_example():
    text = sign_request(PAYLOAD, SECRET)
    assert text.endswith('"}') and '"signature":"' in text
    assert "\\/" in text and "\\u00e9" in text
    assert verify(split_signed_request(text), SECRET)


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("not json", MalformedRequest),
        ("[1]", MalformedRequest),
        ('{"a":1,"a":2,"signature":"x"}', MalformedRequest),
        ('{"a":{"b":1,"b":2},"signature":"x"}', MalformedRequest),
        ('{"command":"aws.status"}', MissingSignature),
        ('{"command":"aws.status","signature":""}', MissingSignature),
        ('{"command":"aws.status","signature":5}', MissingSignature),
    ],
)
def test_malformed_requests(raw, error):
    with pytest.raises(error):
        split_signed_request(raw)


def test_nested_signature_key_is_not_mistaken_for_the_signature():
    payload = {**PAYLOAD, "metadata": {"signature": "not-it"}}
    signed = split_signed_request(STYLES["php"](payload, SECRET))
    assert signed.payload["metadata"] == {"signature": "not-it"}
    assert verify(signed, SECRET)


@dataclass
class _Account:
    id: int = 1
    cdn: int = 158
    enabled: bool = True


class _Accounts:
    def __init__(self, account):
        self.account = account

    def by_api_key(self, api_key):
        return self.account if api_key == PAYLOAD["api_key"] else None

    def api_secret(self, account):
        return SECRET


@pytest.mark.parametrize(
    ("now", "ok"),
    [
        (1_700_000_300, True),
        (1_700_000_300.5, False),
        (1_699_999_700, True),
        (1_699_999_699, False),
    ],
)
def test_timestamp_window_boundary(now, ok):
    signed = split_signed_request(sign_request(PAYLOAD, SECRET))
    accounts = _Accounts(_Account())
    if ok:
        assert authenticate(signed, accounts, window=300, now=now).cdn == 158
    else:
        with pytest.raises(ApiError) as exc:
            authenticate(signed, accounts, window=300, now=now)
        assert exc.value.code.value == "0002"


def test_disabled_account_is_0005_only_after_a_valid_signature():
    accounts = _Accounts(_Account(enabled=False))
    good = split_signed_request(sign_request(PAYLOAD, SECRET))
    with pytest.raises(ApiError) as exc:
        authenticate(good, accounts, window=300, now=PAYLOAD["timestamp"])
    assert exc.value.code.value == "0005"
    bad = split_signed_request(sign_request(PAYLOAD, "f" * 64))
    with pytest.raises(ApiError) as exc:
        authenticate(bad, accounts, window=300, now=PAYLOAD["timestamp"])
    assert exc.value.code.value == "0003"
