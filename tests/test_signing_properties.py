"""Property-based tests (Hypothesis) of request parsing and signing.

- Any JSON object a client can sign verifies, in every client style (PHP json_encode, Python
  json.dumps, compact non-ASCII as Ruby/JS, Perl appending the signature to the text), with
  odd but valid strings (escapes, slashes, line separators, astral characters, BOMs).
- Any tampering with the signed text (a byte changed, dropped or added) or the secret fails,
  unless the change leaves the request meaning exactly the same (the re-encoding fallback
  may then find the signed text again, which is by design).
- No input raises past the envelope: ``handle`` answers (never 0004) or raises Unreadable,
  and over ASGI nothing is a 5xx.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import anyio.from_thread
import httpx
import pytest
from bench.fuzz_api import RAW_TOKENS, json_values
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.wire import STYLES, envelope
from vodpush.api.app import create_app
from vodpush.api.dispatch import Unreadable, handle
from vodpush.protocol.payload import MAX_INT
from vodpush.protocol.signing import split_signed_request, verify

SECRET = "8fc8c48da81e6a2a06a9556379bf798af508dc0792497c678b4c3532ba8b637f"
ODD_VALID = ["/", "\\", '"', "\u2028", "\u2029", "\ufeff", "\x7f", "\n", "é", "🎬", "\U0010ffff"]

# What a client can sign and the server accepts: Unicode scalar values (no lone surrogates:
# no encoder writes them as UTF-8) without NUL; keys without control characters.
values_text = st.text(
    st.one_of(
        st.characters(exclude_characters="\x00", exclude_categories=("Cs",)),
        st.sampled_from(ODD_VALID),
    ),
    max_size=20,
)
key_text = st.text(st.characters(exclude_categories=("Cc", "Cs")), max_size=12)
signable = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-MAX_INT, MAX_INT),
        st.floats(allow_nan=False, allow_infinity=False),
        values_text,
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(key_text, children, max_size=4)
    ),
    max_leaves=10,
)
extras = st.dictionaries(key_text.filter(lambda k: k != "signature"), signable, max_size=5)
STYLE_NAMES = sorted(STYLES)


def request(fields: dict[str, Any]) -> dict[str, Any]:
    base = {
        "command": "aws.status",
        "api_key": "APX4GKLM0RKQLSP2FBO1ROPKSSW47DZE",
        "timestamp": 1_700_000_000,
        "cdn": 158,
    }
    return {**base, **{k: v for k, v in fields.items() if k not in base}}


def same(a: Any, b: Any) -> bool:
    """Equal as JSON, types included (Python says 1 == 1.0 == True)."""
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


@settings(max_examples=300, deadline=None)
@given(fields=extras, style=st.sampled_from(STYLE_NAMES))
def test_whatever_a_client_signs_verifies(fields, style):
    payload = request(fields)
    signed = split_signed_request(STYLES[style](payload, SECRET))
    assert signed.signed_text is not None  # found in the raw text: no re-encoding needed
    assert same(signed.payload, payload)
    assert verify(signed, SECRET)
    assert verify(signed, SECRET, fallback_max_chars=0)
    assert signed.canonical_signature is not None and len(signed.canonical_signature) == 44


@settings(max_examples=100, deadline=None)
@given(fields=extras)
def test_signature_first_verifies_through_the_fallback(fields):
    payload = request(fields)
    for style in ("ruby", "php", "python"):
        text = STYLES[style](payload, SECRET)
        reordered = json.loads(text)
        reordered = {"signature": reordered.pop("signature"), **reordered}
        signed = split_signed_request(json.dumps(reordered))
        assert signed.signed_text is None
        assert verify(signed, SECRET)
        assert not verify(signed, SECRET, fallback_max_chars=0)


@st.composite
def tampered(draw: st.DrawFn) -> tuple[dict[str, Any], str]:
    payload = request(draw(extras))
    text = STYLES[draw(st.sampled_from(STYLE_NAMES))](payload, SECRET)
    cut = text.rindex('"signature"')
    head = text[:cut].encode()
    pos = draw(st.integers(0, len(head) - 1))
    how = draw(st.sampled_from(("change", "drop", "add")))
    if how == "change":
        byte = draw(st.integers(0, 255).filter(lambda b: b != head[pos]))
        head = head[:pos] + bytes([byte]) + head[pos + 1 :]
    elif how == "drop":
        head = head[:pos] + head[pos + 1 :]
    else:
        head = head[:pos] + bytes([draw(st.integers(0, 255))]) + head[pos:]
    try:
        changed = head.decode()
    except UnicodeDecodeError:
        assume(False)  # not text: never reaches the signature check at all
    return payload, changed + text[cut:]


@settings(max_examples=400, deadline=None)
@given(case=tampered())
def test_tampering_fails_unless_nothing_changed(case):
    payload, text = case
    try:
        signed = split_signed_request(text)
    except ValueError:  # not JSON, a value refused by name, no signature: refused anyway
        return
    if verify(signed, SECRET):
        # Only a change that means nothing: white space, an escape spelled differently.
        assert same(signed.payload, payload), text


@settings(max_examples=100, deadline=None)
@given(fields=extras, style=st.sampled_from(STYLE_NAMES), other=st.text(min_size=1, max_size=80))
def test_another_secret_fails(fields, style, other):
    assume(other != SECRET)
    signed = split_signed_request(STYLES[style](request(fields), SECRET))
    assert not verify(signed, other)


# -- no input raises past the envelope ------------------------------------------------------

# Anything at all: lone surrogates, NUL, non-finite and huge numbers, deep nesting.
any_text = st.text(st.characters(exclude_categories=()), max_size=200)
raw_texts = st.one_of(
    any_text,
    st.sampled_from(RAW_TOKENS),
    st.builds(lambda v: json.dumps(v), json_values),
    st.builds(lambda v: json.dumps(v, ensure_ascii=False), json_values),
)


FIELDS = ("path", "destination_path", "bucket", "acl", "metadata", "callback", "limit", "id")


@st.composite
def signed_anything(draw: st.DrawFn, creds: Any) -> str:
    """A request signed with the real secret, so it gets past authentication."""
    command = draw(st.sampled_from(("aws.status", "aws.upload")))
    fields = draw(st.dictionaries(st.text(max_size=12) | st.sampled_from(FIELDS), json_values))
    payload = envelope(creds, command, **fields)
    for name in draw(st.lists(st.sampled_from(("cdn", "timestamp", "command")), max_size=2)):
        payload[name] = draw(json_values)
    style = draw(st.sampled_from(STYLE_NAMES))
    try:
        return STYLES[style](payload, creds.api_secret)
    except (UnicodeEncodeError, ValueError):  # a client cannot sign it as UTF-8 either
        return STYLES["php"](payload, creds.api_secret)


def assert_answered(service: Any, raw: str) -> None:
    for inline in (True, False):  # on the event loop (None: run it in a thread) and off it
        try:
            answer = handle(service, raw, time.perf_counter(), inline=inline)
        except Unreadable:
            return
        if answer is None:
            assert inline
            continue
        assert answer["status"] in ("success", "failure")
        assert answer.get("code") != "0004", answer


@pytest.fixture
def errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    caplog.set_level(logging.INFO)
    yield
    bad = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not bad, [r.getMessage() for r in bad]


PROPERTY = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@PROPERTY
@given(raw=raw_texts)
def test_no_text_raises_past_the_envelope(service, errors, raw):
    assert_answered(service, raw)


@PROPERTY
@given(data=st.data())
def test_no_signed_request_raises_past_the_envelope(service, account, errors, data):
    assert_answered(service, data.draw(signed_anything(account)))


@pytest.fixture
def asgi(service: Any) -> Iterator[Any]:
    with anyio.from_thread.start_blocking_portal() as portal:
        transport = httpx.ASGITransport(app=create_app(service), raise_app_exceptions=False)
        client = httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1")

        def post(body: bytes, content_type: str | None) -> httpx.Response:
            headers = {} if content_type is None else {"content-type": content_type}
            return portal.call(lambda: client.post("/stable/", content=body, headers=headers))

        yield post
        portal.call(client.aclose)


CONTENT_TYPES = (
    None,
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=b",
    "multipart/form-data",
    "application/json",
    "text/plain",
)


@PROPERTY
@given(
    body=st.one_of(
        st.binary(max_size=300),
        raw_texts.map(lambda t: t.encode("utf-8", "surrogatepass")),
        raw_texts.map(lambda t: b"json=" + t.encode("utf-8", "surrogatepass")),
        raw_texts.map(
            lambda t: (
                b'--b\r\nContent-Disposition: form-data; name="json"\r\n\r\n'
                + t.encode("utf-8", "surrogatepass")
                + b"\r\n--b--\r\n"
            )
        ),
    ),
    content_type=st.sampled_from(CONTENT_TYPES),
)
def test_no_body_is_a_5xx_over_asgi(asgi, errors, body, content_type):
    response = asgi(body, content_type)
    assert response.status_code < 500, (response.status_code, response.text[:200])
    answer = response.json()
    assert answer["status"] == "failure" and answer["code"] != "0004"
