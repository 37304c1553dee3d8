"""aws.upload: a push request from the signed payload, queued."""

from __future__ import annotations

from typing import Any

from vodpush.commands.context import CommandContext
from vodpush.operations import UploadArgs, upload


def aws_upload(ctx: CommandContext, payload: dict[str, Any]) -> tuple[str, Any]:
    op = ctx.operation()
    args = UploadArgs.from_values(payload, op)
    # Replays are recognised by the signature's digest: a replayed request answers exactly
    # as the first one did, and queues nothing.
    queued = upload(op, args, replay_key=ctx.signature)
    if args.preflight:  # said only to a client that asked for one
        return "Upload queued", {"id": queued.id, "preflight": "passed"}
    return "Upload queued", {"id": queued.id}
