"""retry: queue a failed or canceled request again (aws.retry, `vodpush request retry`):
due now, its attempts from 0, a new callback when it finishes; its history keeps the
earlier attempts."""

from __future__ import annotations

from vodpush.core.fields import InvalidField
from vodpush.core.ports import RequestStorePort
from vodpush.operations.context import OperationContext
from vodpush.operations.lookup import Changed, RequestRef, changed, no_such_request


def retry(ctx: OperationContext, ref: RequestRef) -> Changed:
    """The caller's account's request ``ref``, queued again; InvalidField naming ``id`` when
    it is not one of the account's, or neither failed nor canceled."""
    return retry_request(ctx.requests, ref, account_id=ctx.account.id)


def retry_any(requests: RequestStorePort, ref: RequestRef) -> Changed:
    """The operator's retry: any account's request."""
    return retry_request(requests, ref, account_id=None)


def retry_request(
    requests: RequestStorePort, ref: RequestRef, *, account_id: int | None
) -> Changed:
    ref.check()
    change = requests.retry(ref.id, account_id=account_id)
    if change.found is None:
        raise no_such_request(ref)
    if not change.changed:
        raise InvalidField(
            "id",
            f"request {ref.id} is {change.found}; only a failed or canceled request can be retried",
        )
    return changed(ref, change)


__all__ = ["retry", "retry_any", "retry_request"]
