"""The Starlette application."""

from __future__ import annotations

import logging
import math
import time
from typing import Any
from urllib.parse import parse_qs

import anyio
import anyio.to_thread
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vodpush import metrics as prometheus
from vodpush.api.dispatch import Unreadable, handle, is_read_only
from vodpush.api.limits import TALLY, Busy, Limits, RequestGuard, busy_envelope
from vodpush.api.request_ids import RequestIds
from vodpush.logs import echo
from vodpush.protocol.envelope import Code, failure
from vodpush.service import Service

API_PATHS = ("/stable/", "/dev/", "/", "/stable", "/dev")

log = logging.getLogger(__name__)


class _Refusal(Exception):
    def __init__(self, http_status: int, message: str) -> None:
        self.http_status = http_status
        self.message = message


class _Json(JSONResponse):
    def render(self, content: Any) -> bytes:
        # orjson: the envelope of a 1000-record aws.status page is the largest thing we encode.
        return orjson.dumps(content)


async def _read_body(request: Request, limit: int, guard: RequestGuard) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Refusal(413, f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    timeout = guard.limits.body_timeout
    try:
        # A client that trickles its body must not hold a connection and its bytes for ever;
        # the bytes it sends count against the budget of all bodies in flight.
        with anyio.fail_after(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _Refusal(413, f"request body is larger than {limit} bytes")
                guard.hold(len(chunk))
                chunks.append(chunk)
    except TimeoutError:
        TALLY.note("body_timeout", client=guard.client)
        raise _Refusal(408, f"the request body did not arrive within {timeout:g} s") from None
    body = b"".join(chunks)
    request._body = body  # let request.form() re-read what we consumed
    return body


async def _json_field(request: Request, body: bytes) -> str:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        text = _decode(body)
    elif content_type == "multipart/form-data":
        try:
            form = await request.form(max_files=0, max_fields=100)
        except HTTPException as exc:  # malformed multipart: say so in the usual envelope
            raise _Refusal(400, f"the multipart body cannot be read: {exc.detail}") from exc
        values = form.getlist("json")
        await form.close()
        if len(values) != 1 or not isinstance(values[0], str):
            raise _Refusal(400, "send exactly one form field named 'json'")
        text = values[0]
    else:
        # application/x-www-form-urlencoded, and clients that send no content type.
        fields = parse_qs(_decode(body), keep_blank_values=True, max_num_fields=100)
        values = fields.get("json", [])
        if len(values) != 1:
            raise _Refusal(400, "send exactly one form field named 'json'")
        text = values[0]
    if not text.strip():
        raise _Refusal(400, "the json field is empty")
    return text


def _decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _Refusal(400, "the request body is not UTF-8") from exc


def create_app(service: Service) -> Starlette:
    limit = service.settings.max_body_bytes
    # Commands do blocking database I/O, so they run in threads; but a few threads serve
    # best: more only contend for the GIL (measured in bench/status_bench.py).
    threads = anyio.CapacityLimiter(service.settings.api_threads)
    # A read on SQLite is a fraction of a millisecond of CPU with nothing to wait for (WAL
    # readers never block): a thread would only add GIL hand-overs between it and the event
    # loop, which halved aws.status throughput (bench/status_bench.py). Writes may wait for
    # the write lock, and PostgreSQL for the network: those keep to the threads.
    inline_reads = service.inline_reads
    limits = Limits(service.settings)

    async def api(request: Request) -> Response:
        started = time.perf_counter()
        guard = limits.guard(request.client.host if request.client else None)
        try:
            body = await _read_body(request, limit, guard)
            # An address that failed too often is answered before any parsing, database or
            # signature work.
            if (busy := guard.refusal()) is not None:
                return _Json(busy_envelope(busy, time.perf_counter() - started))
            raw = await _json_field(request, body)
            envelope = None
            if inline_reads and is_read_only(raw):
                # None: it needs work that must not run on the event loop.
                envelope = handle(service, raw, started, guard, inline=True)
            if envelope is None:
                envelope = await anyio.to_thread.run_sync(
                    handle, service, raw, started, guard, limiter=threads
                )
        except ClientDisconnect:
            # Nobody is left to answer; one line, no traceback.
            log.info(
                "client disconnected before the request was read",
                extra={"action": "api.disconnected"},
            )
            return Response(status_code=400)
        except Busy as exc:  # the body budget is spent: no command was read
            return _Json(
                busy_envelope(exc, time.perf_counter() - started),
                status_code=503,
                headers={"retry-after": str(math.ceil(exc.retry_after)), "connection": "close"},
            )
        except (_Refusal, Unreadable, ValueError) as exc:
            status = exc.http_status if isinstance(exc, _Refusal) else 400
            message = exc.message if isinstance(exc, _Refusal) else str(exc)
            if guard.failed():  # past its budget of failures an address is not logged
                log.info(
                    "request refused",
                    extra={
                        "action": "api.refused",
                        "http_status": status,
                        "code": Code.MISSING_FIELDS.value,
                        "reason": echo(message, 500),
                    },
                )
            return _Json(
                failure(Code.MISSING_FIELDS, message, time.perf_counter() - started),
                status_code=status,
                # The rest of an unread body is not worth waiting for.
                headers={"connection": "close"} if status in (408, 413) else None,
            )
        finally:
            guard.release()
        return _Json(envelope)

    async def healthz(request: Request) -> Response:
        return _Json({"status": "ok"})

    token = service.settings.metrics_token

    async def metrics(request: Request) -> Response:
        if token is not None and not prometheus.authorized(
            request.headers.get("authorization"), token.get_secret_value()
        ):
            return Response(
                "unauthorized\n", 401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'}
            )
        body = await anyio.to_thread.run_sync(prometheus.render, service.queue, limiter=threads)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    routes = [Route(path, api, methods=["POST"]) for path in API_PATHS]
    routes.append(Route("/healthz", healthz, methods=["GET"]))
    if service.settings.metrics_port is None:  # else served apart (server.run_server)
        routes.append(Route("/metrics", metrics, methods=["GET"]))
    app = Starlette(routes=routes, middleware=[Middleware(RequestIds)])
    app.state.service = service
    app.state.limits = limits
    return app
