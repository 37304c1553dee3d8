"""API commands. Each takes the authenticated context and the signed payload, and returns
(message, data) or raises ApiError."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vodpush.commands.cancel import aws_cancel
from vodpush.commands.context import CommandContext
from vodpush.commands.refusals import answering_refusals
from vodpush.commands.retry import aws_retry
from vodpush.commands.status import aws_status
from vodpush.commands.upload import aws_upload

Handler = Callable[[CommandContext, dict[str, Any]], tuple[str, Any]]

COMMANDS: dict[str, Handler] = {
    "aws.upload": answering_refusals(aws_upload),
    "aws.status": answering_refusals(aws_status),
    "aws.cancel": answering_refusals(aws_cancel),
    "aws.retry": answering_refusals(aws_retry),
}
# The fields each command reads beyond the envelope's (command, api_key, timestamp, cdn,
# signature): one table, so that a field no command knows can be named back to the client
# instead of being dropped in silence. A new command or field adds its entry here.
COMMAND_FIELDS: dict[str, frozenset[str]] = {
    "aws.upload": frozenset({"path", "destination_path", "bucket", "acl", "metadata", "callback"}),
    "aws.status": frozenset({"id", "limit", "offset"}),
    "aws.cancel": frozenset({"id"}),
    "aws.retry": frozenset({"id"}),
}
# Commands that only read: they never wait for a write lock.
READ_ONLY_COMMANDS = frozenset({"aws.status"})

__all__ = ["COMMANDS", "COMMAND_FIELDS", "READ_ONLY_COMMANDS", "CommandContext", "Handler"]
