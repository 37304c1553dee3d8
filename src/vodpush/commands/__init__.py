"""API commands. Each takes the authenticated context and the signed payload, and returns
(message, data) or an Answer, or raises ApiError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.commands.refusals import answering_refusals
from vodpush.commands.status import aws_status
from vodpush.commands.upload import aws_upload
from vodpush.operations.status import EXTENDED_FIELDS as STATUS_EXTENDED_FIELDS
from vodpush.protocol.envelope import Answer

# A handler answers (message, data), or an Answer when the envelope carries more.
Handler = Callable[[CommandContext, dict[str, Any]], tuple[str, Any] | Answer]

COMMANDS: dict[str, Handler] = {
    "aws.upload": answering_refusals(aws_upload),
    "aws.status": answering_refusals(aws_status),
}
# The fields each command reads beyond the envelope's (command, api_key, timestamp, cdn,
# signature): one table, so that a field no command knows can be named back to the client
# instead of being dropped in silence. A new command or field adds its entry here.
COMMAND_FIELDS: dict[str, frozenset[str]] = {
    "aws.upload": frozenset({"path", "destination_path", "bucket", "acl", "metadata", "callback"}),
    "aws.status": frozenset({"id", "limit", "offset", *STATUS_EXTENDED_FIELDS}),
}
# Commands that only read: they never wait for a write lock.
READ_ONLY_COMMANDS = frozenset({"aws.status"})
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
