"""aws.status: an account's upload requests, newest first."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.core import records
from vodpush.protocol.fields import as_int

DEFAULT_LIMIT = 25


def aws_status(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    limit = payload.get("limit")
    offset = payload.get("offset")
    request_id = payload.get("id")
    limit = (
        DEFAULT_LIMIT
        if limit is None
        else as_int(limit, "limit", minimum=1, maximum=ctx.settings.status_max_limit)
    )
    offset = 0 if offset is None else as_int(offset, "offset", minimum=0, maximum=2**31)
    if request_id is not None:
        request_id = as_int(request_id, "id", minimum=1, maximum=2**62)
    rows = ctx.requests.list_for_account(
        ctx.account.id, limit=limit, offset=offset, request_id=request_id
    )
    return "Found AWS Status", [records.render(row) for row in rows]
