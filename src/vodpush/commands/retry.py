"""aws.retry: queue one of the caller's failed or canceled requests again."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.operations import RequestRef, retry


def aws_retry(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    done = retry(ctx.operation(), RequestRef.from_values(payload))
    return "Upload queued again", done.record
