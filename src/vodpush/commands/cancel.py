"""aws.cancel: stop one of the caller's requests that has not finished."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.operations import RequestRef, cancel


def aws_cancel(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    done = cancel(ctx.operation(), RequestRef.from_values(payload))
    return "Upload canceled", done.record
