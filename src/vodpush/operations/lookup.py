"""Which request a command names (aws.cancel, aws.retry: its ``id``), and what a change of
one answers: the request's record as it stands after the change."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vodpush.core import records
from vodpush.core.fields import InvalidField, read_int, require
from vodpush.core.requests import StateChange
from vodpush.operations.status import MAX_ID


@dataclass(frozen=True)
class RequestRef:
    """The request ``id`` a caller names."""

    id: int

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> RequestRef:
        """MissingFields without ``id``; InvalidField unless it is an integer in range (a
        JSON number or a digit string)."""
        require(values, ("id",))
        return cls(id=read_int(values["id"], "id", minimum=1, maximum=MAX_ID))

    def check(self) -> None:
        """InvalidField for a ref built directly with an id out of range."""
        read_int(self.id, "id", minimum=1, maximum=MAX_ID)


@dataclass(frozen=True)
class Changed:
    """A request changed: the state it was in, and its aws.status record now."""

    previous: str
    record: dict[str, Any]


def no_such_request(ref: RequestRef) -> InvalidField:
    # The same words for an id that is not there and one of another account: the answer
    # must not tell that the other account's request exists.
    return InvalidField("id", f"no such request: {ref.id}")


def changed(ref: RequestRef, change: StateChange) -> Changed:
    """The answer to a change the store made: the record as the change left it."""
    assert change.found is not None and change.row is not None, ref
    return Changed(previous=change.found, record=records.render(change.row))
