"""aws.callbacks: the delivery history of a request's callback; aws.redeliver: send it
again."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.core.callbacks import render_history
from vodpush.operations import RequestRef, callback_history, redeliver


def aws_callbacks(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    history = callback_history(ctx.operation(), RequestRef.from_values(payload))
    return "Found callback history", render_history(history)


def aws_redeliver(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    # The signature's digest names the redelivery: the same signed request sent again
    # answers as the first one did and sends nothing more.
    done = redeliver(
        ctx.operation(), RequestRef.from_values(payload), replay_key=ctx.signature or None
    )
    return "Callback redelivery queued", done.record()
