"""history: one request's record and the steps of its life (`vodpush request show`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vodpush.core import records
from vodpush.core.ports import RequestStorePort
from vodpush.operations.lookup import RequestRef, no_such_request


@dataclass(frozen=True)
class History:
    record: dict[str, Any]  # as aws.status shows it
    events: list[dict[str, Any]]  # oldest first (core.records.render_event)

    def to_dict(self) -> dict[str, Any]:
        return {**self.record, "events": self.events}


def history(requests: RequestStorePort, ref: RequestRef) -> History:
    """Any account's request (the operator's view); InvalidField naming ``id`` if none."""
    ref.check()
    row = requests.get(ref.id)
    if row is None:
        raise no_such_request(ref)
    steps = requests.events(ref.id)
    return History(record=records.render(row), events=[records.render_event(e) for e in steps])


__all__ = ["History", "history"]
