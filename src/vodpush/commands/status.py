"""aws.status: an account's upload requests, newest first."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.operations import StatusQuery, status
from vodpush.protocol.envelope import Answer


def aws_status(ctx: CommandContext, payload: dict[str, Any]) -> Answer:
    query = StatusQuery.from_values(payload, ctx.settings)
    page = status(ctx.operation(), query)
    # `total` only for a query beyond the reference API's: a client that sends only the
    # documented fields gets exactly the documented answer.
    members = {} if page.total is None else {"total": page.total}
    return Answer("Found AWS Status", page.records(), members)
