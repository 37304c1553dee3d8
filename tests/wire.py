"""How each known client language builds the signed ``json`` field, reproduced byte for
byte, and how it sends it. Tests use these to talk to a live server over HTTP."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import random
import threading
import time
from typing import Any

import httpx

from vodpush.protocol.signing import php_json_encode


def _hmac_b64(secret: str, text: str) -> str:
    digest = hmac.new(secret.encode(), text.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


def php_style(payload: dict[str, Any], secret: str) -> str:
    """PHP: json_encode (\\/ and \\uXXXX), sign, add signature, json_encode again."""
    text = php_json_encode(payload)
    return php_json_encode({**payload, "signature": _hmac_b64(secret, text)})


def perl_style(payload: dict[str, Any], secret: str, seed: int = 7) -> str:
    """Perl: encode_json with random key order, raw UTF-8, '/' unescaped; Digest::SHA's
    unpadded base64 padded by hand; the signature appended to the text with a regex."""
    items = list(payload.items())
    random.Random(seed).shuffle(items)
    text = json.dumps(dict(items), separators=(",", ":"), ensure_ascii=False)
    sig = _hmac_b64(secret, text).rstrip("=")
    while len(sig) % 4:
        sig += "="
    assert text.endswith("}")
    return text[:-1] + ',"signature":"' + sig + '"}'


def perl_style_unpadded(payload: dict[str, Any], secret: str) -> str:
    """A Perl client that forgot to pad its base64."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    sig = _hmac_b64(secret, text).rstrip("=")
    return text[:-1] + ',"signature":"' + sig + '"}'


def ruby_style(payload: dict[str, Any], secret: str) -> str:
    """Ruby: JSON.generate (compact, raw UTF-8, '/' unescaped), twice."""
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    signed = {**payload, "signature": _hmac_b64(secret, text)}
    return json.dumps(signed, separators=(",", ":"), ensure_ascii=False)


def python_style(payload: dict[str, Any], secret: str) -> str:
    """Python: json.dumps defaults (', ' and ': ', ASCII escapes), twice."""
    text = json.dumps(payload)
    return json.dumps({**payload, "signature": _hmac_b64(secret, text)})


STYLES = {
    "php": php_style,
    "perl": perl_style,
    "perl_unpadded": perl_style_unpadded,
    "ruby": ruby_style,
    "python": python_style,
}


def envelope(creds: Any, command: str, **fields: Any) -> dict[str, Any]:
    return {
        "command": command,
        "api_key": creds.api_key,
        "timestamp": int(time.time()),
        "cdn": creds.cdn,
        **fields,
    }


_clients = threading.local()


def http() -> httpx.Client:
    """This thread's HTTP client. Each request still has a connection of its own (none is
    kept alive), as with ``httpx.post()``; only the client is shared, because making one
    costs some 60 ms (it loads the CA bundle), more than most requests here."""
    client = getattr(_clients, "client", None)
    if client is None:
        limits = httpx.Limits(max_keepalive_connections=0)
        client = _clients.client = httpx.Client(timeout=10, limits=limits)
    return client


def post(url: str, json_text: str, *, encoding: str = "urlencoded", path: str = "/stable/"):
    """Send the field as a real client would: urlencoded (Perl LWP), multipart (PHP curl,
    Ruby rest-client) or a raw JSON body."""
    target = url + path
    if encoding == "urlencoded":
        return http().post(target, data={"json": json_text}, timeout=10)
    if encoding == "multipart":
        return http().post(target, files={"json": (None, json_text)}, timeout=10)
    if encoding == "raw":
        return http().post(
            target,
            content=json_text.encode(),
            headers={"content-type": "application/json"},
            timeout=10,
        )
    raise ValueError(encoding)


def call(
    url: str,
    creds: Any,
    command: str,
    *,
    style: str = "php",
    encoding: str = "urlencoded",
    secret: str | None = None,
    **fields: Any,
) -> dict[str, Any]:
    payload = envelope(creds, command, **fields)
    text = STYLES[style](payload, secret or creds.api_secret)
    response = post(url, text, encoding=encoding)
    assert response.status_code == 200, response.text
    return response.json()
