"""API commands. Each takes the authenticated context and the signed payload, and returns
(message, data) or an Answer, or raises ApiError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vodpush.commands.callbacks import aws_callbacks, aws_redeliver
from vodpush.commands.cancel import aws_cancel
from vodpush.commands.context import CommandContext
from vodpush.commands.refusals import answering_refusals
from vodpush.commands.retry import aws_retry
from vodpush.commands.status import aws_status
from vodpush.commands.upload import aws_upload
from vodpush.core.options import REQUEST_OPTIONS
from vodpush.operations.status import EXTENDED_FIELDS as STATUS_EXTENDED_FIELDS
from vodpush.protocol.envelope import Answer

# A handler answers (message, data), or an Answer when the envelope carries more.
Handler = Callable[[CommandContext, dict[str, Any]], tuple[str, Any] | Answer]

COMMANDS: dict[str, Handler] = {
    "aws.upload": answering_refusals(aws_upload),
    "aws.status": answering_refusals(aws_status),
    "aws.cancel": answering_refusals(aws_cancel),
    "aws.retry": answering_refusals(aws_retry),
    "aws.callbacks": answering_refusals(aws_callbacks),
    "aws.redeliver": answering_refusals(aws_redeliver),
}
# The fields each command reads beyond the envelope's (command, api_key, timestamp, cdn,
# signature): one table, so that a field no command knows can be named back to the client
# instead of being dropped in silence. A new command or field adds its entry here.
COMMAND_FIELDS: dict[str, frozenset[str]] = {
    "aws.upload": frozenset(
        {
            "path",
            "destination_path",
            "bucket",
            "acl",
            "metadata",
            "callback",
            "idempotency_key",
            "preflight",
            *REQUEST_OPTIONS,
        }
    ),
    "aws.status": frozenset({"id", "limit", "offset", *STATUS_EXTENDED_FIELDS}),
    "aws.cancel": frozenset({"id"}),
    "aws.retry": frozenset({"id"}),
    "aws.callbacks": frozenset({"id"}),
    "aws.redeliver": frozenset({"id"}),
}
# Commands that only read: they never wait for a write lock. Where reads never wait (SQLite,
# memory), the small ones run on the event loop: each must cost about what an aws.status
# page does (aws.callbacks: one row, at most HISTORY_LIMIT attempts, by index).
READ_ONLY_COMMANDS = frozenset({"aws.status", "aws.callbacks"})
# Fields that make a read-only command cost more than the event loop may spend on SQLite
# (see api.dispatch.is_read_only): aws.status's filters and keyset paging count what they
# match, and a range filter reads its whole range of the index.
COSTLY_FIELDS: dict[str, frozenset[str]] = {
    "aws.status": frozenset(STATUS_EXTENDED_FIELDS),
}

__all__ = [
    "COMMANDS",
    "COMMAND_FIELDS",
    "COSTLY_FIELDS",
    "READ_ONLY_COMMANDS",
    "Answer",
    "CommandContext",
    "Handler",
]
