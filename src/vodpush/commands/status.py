"""aws.status: an account's upload requests, newest first."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.operations import StatusQuery, status


def aws_status(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    query = StatusQuery.from_values(payload, ctx.settings)
    return "Found AWS Status", status(ctx.operation(), query).records()
