"""A request id for every HTTP request: the client's (or its proxy's) ``X-Request-ID`` when
it is a short token, else one made here. Every log line written while the request is served
carries it (``http_request_id``) and the client's address (``client_address``: the peer, or
the address a trusted proxy forwarded, FORWARDED_ALLOW_IPS); the answer echoes it in
``X-Request-ID``."""

from __future__ import annotations

import re
import secrets
from typing import Any

from vodpush.logs import bound

HEADER = b"x-request-id"
# What a client's id may be: it goes into log lines and a response header as it is.
MAX_ID_CHARS = 128
_ID = re.compile(rb"[A-Za-z0-9._:+/=@-]{1,%d}" % MAX_ID_CHARS)


def new_request_id() -> str:
    return secrets.token_hex(8)


def request_id(headers: list[tuple[bytes, bytes]]) -> str:
    """The client's id when it sent exactly one that is a short token, else a new one."""
    sent = [value for name, value in headers if name.lower() == HEADER]
    if len(sent) == 1 and _ID.fullmatch(sent[0]):
        return sent[0].decode("ascii")
    return new_request_id()


class RequestIds:
    """ASGI middleware: binds the request id and client address to the request's log
    context and adds ``X-Request-ID`` to the answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id(scope.get("headers") or [])
        client = scope.get("client")
        header = (HEADER, rid.encode("ascii"))

        async def send_with_id(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        with bound(http_request_id=rid, client_address=client[0] if client else None):
            await self.app(scope, receive, send_with_id)
