"""Replaying one captured aws.upload, spelled every way its signature can be spelled, queues
it once: over HTTP, on SQLite and PostgreSQL (issue 7, item 4)."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import pytest
from sqlalchemy import text

from tests.wire import call, envelope, php_style, post, ruby_style

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
FILE = "sestore1/jb/videos/clip.mp4"
_SIGNATURE = re.compile(r'"signature":"(?P<value>[^"]*)"')


@pytest.fixture
def clip(account, sestore_root: Path) -> str:
    target = sestore_root / FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 1000)
    return FILE


def upload_payload(account) -> dict:
    return envelope(
        account,
        "aws.upload",
        path=FILE,
        destination_path="replay/clip.mp4",
        bucket="my-bucket",
        acl="private",
        metadata={"title": "once"},
        callback="",
    )


def with_signature(signed: str, json_value: str) -> str:
    """The captured text with its signature's JSON string body replaced."""
    return _SIGNATURE.sub(lambda _: f'"signature":"{json_value}"', signed, count=1)


def other_trailing_bits(sig: str) -> str:
    """The same 32 bytes, spelled with non-zero bits past the data in the last character
    (a lenient base64 decoder reads both as one digest; no encoder writes this)."""
    index = B64.index(sig[42])
    return sig[:42] + B64[(index & ~3) | 1] + sig[43:]


def test_signature_variants_queue_one_request(live_server, account, clip, service):
    captured = php_style(upload_payload(account), account.api_secret)
    # As it travels in the PHP text, '/' is escaped: the JSON value is not the signature.
    sig_json = _SIGNATURE.search(captured)["value"]
    sig = sig_json.replace("\\/", "/")
    assert len(sig) == 44 and sig.endswith("=")
    digest = base64.b64decode(sig)

    first = post(live_server.url, captured).json()
    assert first["status"] == "success", first
    request_id = first["data"]["id"]

    # JSON-level spellings of the same string, and base64-level variants of the same digest.
    accepted = {
        "unescaped slashes": sig,
        "padding dropped": sig.rstrip("="),
        "padding dropped, escaped": sig_json.rstrip("="),
        "spaces around": "  " + sig + " ",
        "trailing newline (Ruby encode64)": sig + "\\n",
        "CRLF after": sig + "\\r\\n",
        "newline inside": sig[:20] + "\\n" + sig[20:],
        "unicode escapes": "".join(f"\\u{ord(c):04x}" for c in sig),
    }
    refused = {
        "space inside": sig[:20] + " " + sig[20:],
        "tab inside": sig[:20] + "\\t" + sig[20:],
        "trailing bits altered": other_trailing_bits(sig),
        "trailing bits altered, unpadded": other_trailing_bits(sig).rstrip("="),
        "extra padding": sig + "=",
        "huge white space padding": sig + " " * 200_000,
        "huge newline padding": sig + "\\n" * 50_000,
        "url-safe alphabet": sig.replace("+", "-").replace("/", "_"),
        "truncated": sig[:40],
    }
    assert base64.b64decode(other_trailing_bits(sig)) == digest  # really the same bytes
    if "+" not in sig and "/" not in sig:  # nothing to translate in this signature
        del refused["url-safe alphabet"]

    encodings = ("urlencoded", "multipart", "raw")
    for i, (name, value) in enumerate(accepted.items()):
        answer = post(
            live_server.url, with_signature(captured, value), encoding=encodings[i % 3]
        ).json()
        assert answer["status"] == "success", (name, answer)
        assert answer["data"] == {"id": request_id}, name
    for i, (name, value) in enumerate(refused.items()):
        response = post(live_server.url, with_signature(captured, value), encoding=encodings[i % 3])
        assert response.status_code == 200, (name, response.text[:300])
        answer = response.json()
        assert answer["status"] == "failure", name
        assert answer["code"] == "0003", (name, answer)
        assert "signature" in answer["message"], name

    status = call(live_server.url, account, "aws.status", limit=100)
    assert [r["id"] for r in status["data"]] == [request_id]
    with service.engine.connect() as conn:
        stored = conn.execute(text("SELECT signature FROM upload_requests")).scalars().all()
    assert stored == [sig]  # the canonical spelling, whatever was sent first


def test_unpadded_first_then_padded_is_one_request(live_server, account, clip):
    """A Perl client that does not pad, replayed by one that does (or the reverse)."""
    captured = ruby_style(upload_payload(account), account.api_secret)
    sig = _SIGNATURE.search(captured)["value"]
    first = post(live_server.url, with_signature(captured, sig.rstrip("=")), encoding="raw")
    again = post(live_server.url, captured, encoding="multipart")
    assert first.json()["status"] == "success", first.text
    assert again.json()["data"] == first.json()["data"]
    status = call(live_server.url, account, "aws.status", limit=100)
    assert len(status["data"]) == 1


def test_new_signature_still_queues_a_new_request(live_server, account, clip):
    """Replay detection keys on the digest: a different request is a different digest."""
    payload = upload_payload(account)
    first = post(live_server.url, php_style(payload, account.api_secret)).json()
    changed = {**payload, "destination_path": "replay/other.mp4"}
    second = post(live_server.url, php_style(changed, account.api_secret)).json()
    assert first["status"] == second["status"] == "success"
    assert first["data"]["id"] != second["data"]["id"]
