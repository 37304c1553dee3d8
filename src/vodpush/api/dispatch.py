"""From the text of the ``json`` field to the response envelope: parse, authenticate, run
the command. Runs in a worker thread (it does blocking database I/O), or inline on the event
loop for a small read-only request, where nothing costly may run."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from vodpush.api.limits import TALLY, Busy, RequestGuard, busy_envelope
from vodpush.commands import (
    COMMAND_FIELDS,
    COMMANDS,
    COSTLY_FIELDS,
    READ_ONLY_COMMANDS,
    CommandContext,
)
from vodpush.core.requests import StoreUnavailable
from vodpush.logs import echo
from vodpush.protocol.auth import authenticate
from vodpush.protocol.envelope import (
    Answer,
    ApiError,
    Code,
    RetryLater,
    failure,
    success,
    unknown_field_warnings,
)
from vodpush.protocol.fields import require
from vodpush.protocol.payload import InvalidPayload
from vodpush.protocol.signing import (
    FallbackDeferred,
    MissingSignature,
    SignedRequest,
    split_signed_request,
)
from vodpush.service import Service

log = logging.getLogger(__name__)

# What a client is told to wait when the database is away for a moment (a restart, a
# failover): sending the same signed request again is safe, a replay returns the first id.
STORE_RETRY_AFTER = 2.0

# Only requests this small run inline on the event loop: an aws.status is a few hundred
# characters, and parsing (twice) more than this would hold up every other connection.
INLINE_MAX_CHARS = 16_384


class Unreadable(Exception):
    """No command could be read at all: answered with HTTP 400."""


def parse(raw: str) -> SignedRequest:
    """The signed request in ``raw``; Unreadable when there is none, ApiError 0007 naming
    the field for a value no command may get, MissingSignature."""
    try:
        return split_signed_request(raw)
    except MissingSignature:
        raise
    except InvalidPayload as exc:
        raise ApiError(Code.INVALID_FIELD, str(exc)) from exc
    except ValueError as exc:
        raise Unreadable(str(exc)) from exc


def is_read_only(raw: str) -> bool:
    """Whether ``raw`` is a small request naming a read-only command, without a field that
    makes it costly (COSTLY_FIELDS): a quick look to choose where to run it; ``handle``
    still parses, checks and refuses as it always does."""
    if len(raw) > INLINE_MAX_CHARS:
        return False
    try:
        payload = orjson.loads(raw)
        command = payload.get("command")
    except (orjson.JSONDecodeError, AttributeError):
        return False
    if not isinstance(command, str) or command not in READ_ONLY_COMMANDS:
        return False
    return COSTLY_FIELDS.get(command, frozenset()).isdisjoint(payload)


def field_warnings(command: str, payload: dict[str, Any]) -> list[str]:
    """The fields of ``payload`` that neither the envelope nor ``command`` reads, named
    back so that a misspelt or unsupported field is not dropped in silence."""
    return unknown_field_warnings(payload, COMMAND_FIELDS.get(command, frozenset()))


def handle(
    service: Service,
    raw: str,
    started: float,
    guard: RequestGuard | None = None,
    *,
    inline: bool = False,
) -> dict[str, Any] | None:
    """The response envelope for ``raw``; raises only Unreadable. With ``inline`` (on the
    event loop), returns None instead of doing costly work (the signature's re-encoding
    fallback): the caller then runs it again in a thread."""
    command: Any = None
    account_id = None
    username = None
    warnings: list[str] = []
    try:
        try:
            signed = parse(raw)
        except MissingSignature as exc:
            raise ApiError(Code.MISSING_FIELDS, "missing required field(s): signature") from exc
        command = signed.payload.get("command")
        require(signed.payload, ("command",))
        handler = COMMANDS.get(command) if isinstance(command, str) else None
        if handler is None:
            raise ApiError(Code.UNKNOWN_COMMAND, f"unrecognized API command: {echo(command, 64)!r}")
        account = authenticate(
            signed,
            service.accounts,
            window=service.settings.timestamp_window,
            fallback_max_chars=service.settings.signature_fallback_max_chars,
            inline=inline,
        )
        account_id, username = account.id, account.username
        if guard is not None:
            guard.check_account(account.id)  # raises Busy over the account's request rate
        # Named only to a caller who signed the request: the command's own answers, its
        # refusals included (a misspelt field's warning explains a "missing field").
        warnings = field_warnings(command, signed.payload)
        ctx = CommandContext(
            account=account,
            # Replays are recognised by the digest, whichever spelling of it was sent.
            signature=signed.canonical_signature or "",
            settings=service.settings,
            requests=service.requests,
            preflight=service.preflight,
        )
        result = handler(ctx, signed.payload)
        answer = result if isinstance(result, Answer) else Answer(*result)
        if command not in READ_ONLY_COMMANDS:
            data = answer.data
            log.info(
                "command accepted",
                extra={
                    "action": "api.accepted",
                    "command": command,
                    "account_id": account_id,
                    "username": username,
                    # The request it queued or changed (aws.upload: the new request's id).
                    "request_id": data.get("id") if isinstance(data, dict) else None,
                },
            )
        return success(
            answer.message,
            answer.data,
            time.perf_counter() - started,
            members=answer.members,
            warnings=warnings,
        )
    except FallbackDeferred:
        return None
    except ApiError as exc:
        if guard is not None and account_id is None:
            guard.failed()  # counts towards the limits on failures before authentication
        if isinstance(exc, Busy):  # Tally logs those, a line per burst, not per request
            return busy_envelope(exc, time.perf_counter() - started)
        log.info(
            "command refused",
            extra={
                "action": "api.refused",
                "command": echo(command),
                "account_id": account_id,
                "username": username,
                "code": exc.code.value,
                "reason": echo(exc.message, 500),
            },
        )
        answer = failure(exc.code, exc.message, time.perf_counter() - started, warnings=warnings)
        if isinstance(exc, RetryLater):  # a command's own limit: say when, as Busy does
            answer["retry_after"] = exc.retry_after
        return answer
    except Unreadable:
        raise
    except StoreUnavailable:
        # A database restart must not turn every call into a logged traceback and an
        # "internal error": it passes, and the client may send the same request again.
        TALLY.note("database_unavailable", command=echo(command))
        busy = Busy(
            "the service's database is unavailable for a moment; send the same request again",
            STORE_RETRY_AFTER,
        )
        return busy_envelope(busy, time.perf_counter() - started)
    except Exception:
        log.exception(
            "command failed",
            extra={
                "action": "api.error",
                "command": echo(command),
                "account_id": account_id,
                "username": username,
            },
        )
        return failure(
            Code.SERVER_ERROR,
            "unexpected server error; the request was not processed",
            time.perf_counter() - started,
        )
