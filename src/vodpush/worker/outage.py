"""Riding out a database outage in the worker.

A store raises core.requests.StoreUnavailable for an error that passes (a dropped or refused
connection, a server restart, a serialization failure, SQLite busy). Here: ``persist``
tries a store call again with a short, capped backoff for a bounded time; ``PatientLedger``
does so for every call of an upload's part ledger; ``FailureLog`` logs a call that fails
over and over (a heartbeat, a claim) at a sane rate instead of once a try.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from vodpush import metrics
from vodpush.core.checkpoint import MultipartCheckpoint, PartLedger, PartRecord
from vodpush.core.requests import LeaseLost, StoreUnavailable
from vodpush.worker.retry import store_delay

log = logging.getLogger(__name__)

T = TypeVar("T")


def _never() -> bool:
    return False


def persist(
    operation: str,
    call: Callable[[], T],
    *,
    budget: float,
    give_up: Callable[[], bool] = _never,
    extra: dict[str, Any] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """``call()``, tried again while it raises StoreUnavailable, for up to ``budget``
    seconds or until ``give_up()``; then that StoreUnavailable is raised. Any other error
    (LeaseLost included) leaves at once.

    Only for calls that may be repeated: a write whose commit went unanswered may have been
    applied, and the store's writes name the lease or the state they expect, so a repeat of
    an applied one is refused (LeaseLost) instead of applied twice.
    """
    started = clock()
    tries = 0
    fields = {"operation": operation, **(extra or {})}
    while True:
        try:
            result = call()
        except StoreUnavailable as exc:
            tries += 1
            metrics.STORE_UNAVAILABLE.labels(operation).inc()
            waited = clock() - started
            if waited >= budget or give_up():
                log.warning(
                    "database still unavailable; %s given up after %d tries",
                    operation,
                    tries,
                    extra={
                        "action": "store.gave_up",
                        "error": str(exc),
                        "tries": tries,
                        "seconds": round(waited, 3),
                        **fields,
                    },
                )
                raise
            if tries == 1:  # one line a call, not one a try
                log.warning(
                    "database unavailable; %s will be tried again",
                    operation,
                    extra={"action": "store.retry", "error": str(exc), **fields},
                )
            sleep(min(store_delay(tries), budget - waited))
            continue
        if tries:
            log.info(
                "database answered; %s done after %d tries",
                operation,
                tries + 1,
                extra={
                    "action": "store.recovered",
                    "tries": tries + 1,
                    "seconds": round(clock() - started, 3),
                    **fields,
                },
            )
        return result


class PatientLedger:
    """A PartLedger whose calls ride out a short database outage (``persist``), so an
    upload pauses instead of failing. Once ``lost()`` (another claim holds the request) a
    call raises LeaseLost instead of being tried again. Every ledger call may be repeated:
    ``part_done`` is an upsert, ``begin``, ``clear`` and ``give_up`` replace (a repeat of
    an applied ``give_up`` finds no checkpoint left to record), the others read."""

    def __init__(
        self,
        ledger: PartLedger,
        *,
        budget: float,
        lost: Callable[[], bool],
        give_up: Callable[[], bool] = _never,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self._ledger = ledger
        self._budget = budget
        self._lost = lost
        self._give_up = give_up
        self._extra = extra or {}

    def _call(self, operation: str, call: Callable[[], T]) -> T:
        def attempt() -> T:
            if self._lost():
                raise LeaseLost(f"lease lost before {operation}")
            return call()

        return persist(
            operation, attempt, budget=self._budget, give_up=self._give_up, extra=self._extra
        )

    def load(self) -> MultipartCheckpoint | None:
        return self._call("ledger.load", self._ledger.load)

    def begin(self, checkpoint: MultipartCheckpoint) -> None:
        self._call("ledger.begin", lambda: self._ledger.begin(checkpoint))

    def part_done(self, part_number: int, record: PartRecord) -> None:
        self._call("ledger.part_done", lambda: self._ledger.part_done(part_number, record))

    def clear(self) -> None:
        self._call("ledger.clear", self._ledger.clear)

    def give_up(self) -> None:
        self._call("ledger.give_up", self._ledger.give_up)

    def confirm(self) -> None:
        self._call("ledger.confirm", self._ledger.confirm)


class FailureLog:
    """Logs a call that may fail over and over (a heartbeat, a claim) at a sane rate: the
    first failure, then a reminder every ``every`` seconds with the count, and one line when
    it works again. StoreUnavailable is logged without a traceback; anything else (a bug)
    with one."""

    def __init__(
        self,
        operation: str,
        *,
        action: str,
        every: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._operation = operation
        self._action = action
        self._every = every
        self._clock = clock
        self._lock = threading.Lock()
        self._since: float | None = None  # when the failures began
        self._last = 0.0  # when one was last logged
        self._failures = 0

    def failed(self, exc: BaseException, **extra: Any) -> None:
        unavailable = isinstance(exc, StoreUnavailable)
        if unavailable:
            metrics.STORE_UNAVAILABLE.labels(self._operation).inc()
        with self._lock:
            now = self._clock()
            self._failures += 1
            if self._since is None:
                self._since = now
            elif now - self._last < self._every:
                return
            self._last = now
            failures, seconds = self._failures, now - self._since
        log.log(
            logging.WARNING if unavailable else logging.ERROR,
            "%s failed (%d times in %.0f s): %s",
            self._operation,
            failures,
            seconds,
            exc if unavailable else type(exc).__name__,
            exc_info=None if unavailable else exc,
            extra={
                "action": self._action,
                "operation": self._operation,
                "failures": failures,
                "seconds": round(seconds, 3),
                **extra,
            },
        )

    def ok(self) -> None:
        if self._since is None:  # the usual case, without the lock
            return
        with self._lock:
            if self._since is None:
                return
            failures, seconds = self._failures, self._clock() - self._since
            self._since, self._failures = None, 0
        log.info(
            "%s works again after %d failures in %.0f s",
            self._operation,
            failures,
            seconds,
            extra={
                "action": "store.recovered",
                "operation": self._operation,
                "failures": failures,
                "seconds": round(seconds, 3),
            },
        )
