"""cancel: stop a queued, running or retrying request (aws.cancel, `vodpush request
cancel`). The store does it in one write (core.ports.RequestStorePort.cancel); a worker
uploading it finds its lease gone at its next heartbeat, stops, and aborts the multipart
upload the cancel handed to the reaper."""

from __future__ import annotations

from vodpush.core.fields import InvalidField
from vodpush.core.ports import RequestStorePort
from vodpush.core.records import CANCELED_BY_CUSTOMER, CANCELED_BY_OPERATOR
from vodpush.operations.context import OperationContext
from vodpush.operations.lookup import Changed, RequestRef, changed, no_such_request


def cancel(ctx: OperationContext, ref: RequestRef) -> Changed:
    """The caller's account's request ``ref``, canceled; InvalidField naming ``id`` when it
    is not one of the account's, has finished, or is finishing."""
    return cancel_request(
        ctx.requests, ref, account_id=ctx.account.id, message=CANCELED_BY_CUSTOMER
    )


def cancel_any(requests: RequestStorePort, ref: RequestRef) -> Changed:
    """The operator's cancel: any account's request."""
    return cancel_request(requests, ref, account_id=None, message=CANCELED_BY_OPERATOR)


def cancel_request(
    requests: RequestStorePort, ref: RequestRef, *, account_id: int | None, message: str
) -> Changed:
    ref.check()
    change = requests.cancel(ref.id, account_id=account_id, message=message)
    if change.found is None:
        raise no_such_request(ref)
    if change.finishing:
        raise InvalidField(
            "id",
            f"request {ref.id} is finishing (its last S3 call is under way) and can no "
            "longer be canceled; its outcome follows shortly",
        )
    if not change.changed:
        raise InvalidField(
            "id",
            f"request {ref.id} has already finished ({change.found}); only a queued, "
            "running or retrying request can be canceled",
        )
    return changed(ref, change)


__all__ = ["cancel", "cancel_any", "cancel_request"]
