"""The reaper: aborts the multipart uploads that were given up while S3 did not confirm
their abort (core.orphans; the stores record them when a request drops its checkpoint),
and forgets each once S3 confirms it gone (NoSuchUpload counts). The worker runs it in a
thread, a pass every ``reap_interval`` seconds; ``vodpush reap`` runs it on demand.

A claim pushes the orphan's next time past a lease, so two reapers never abort the same
upload at once; a failed abort is due again after a backoff that doubles up to a cap. Each
abort uses the account's S3 client as the account's settings are now.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from vodpush import metrics
from vodpush.core.accounts import AccountRecord
from vodpush.core.orphans import Orphan
from vodpush.service import Service
from vodpush.transfer import abort_error
from vodpush.worker import retry
from vodpush.worker.outage import FailureLog

log = logging.getLogger(__name__)

# Longer than one abort can take (connect and read timeouts times botocore's own retries):
# a reaper that dies holding a claim only delays that orphan by this much.
REAP_LEASE_SECONDS = 300.0
# How much of an error a row keeps.
ERROR_CHARS = 500

# The S3 client of an account (worker.clients.AccountClients).
ClientFor = Callable[[AccountRecord], Any]


class Reaper:
    def __init__(self, service: Service, client_for: ClientFor) -> None:
        self._orphans = service.orphans
        self._accounts = service.accounts
        self._settings = service.settings
        self._client_for = client_for
        # A database outage: a line when passes start failing, and one when they work again
        # (no traceback); any other error with its traceback.
        self._errors = FailureLog("reap", action="orphan.reap_error")

    def run(self, stopping: threading.Event) -> None:
        """The worker's reaper thread: a pass now, then one every ``reap_interval``, until
        ``stopping`` is set."""
        while not stopping.is_set():
            try:
                self.reap_due(stopping)
            except Exception as exc:
                # The store is down, say: the orphans wait for the next pass.
                self._errors.failed(exc)
            else:
                self._errors.ok()
            stopping.wait(self._settings.reap_interval)

    def reap_due(self, stopping: threading.Event | None = None) -> tuple[int, int]:
        """Abort every orphan that is due, one claim at a time, until none is (or
        ``stopping`` is set); (aborted, failed)."""
        aborted = failed = 0
        while stopping is None or not stopping.is_set():
            orphan = self._orphans.claim(REAP_LEASE_SECONDS)
            if orphan is None:
                break
            if self.abort(orphan) is None:
                aborted += 1
            else:
                failed += 1
        metrics.ORPHANS_PENDING.set(self._orphans.count())
        return aborted, failed

    def reap_now(self, orphan_id: int) -> tuple[Orphan, str | None] | None:
        """Abort the orphan ``orphan_id`` now, due or not: (the orphan, why its abort
        failed or None), or None when it is no longer recorded (another reaper's abort
        was confirmed meanwhile)."""
        orphan = self._orphans.claim(REAP_LEASE_SECONDS, orphan_id=orphan_id)
        if orphan is None:
            return None
        return orphan, self.abort(orphan)

    def reap_request(self, request_id: int) -> int:
        """Abort now, due or not, the orphans of request ``request_id`` (a cancel recorded
        its multipart upload, and the worker that held it has stopped sending parts); how
        many S3 confirmed gone. A failed abort is due again later, as any."""
        gone = 0
        for orphan in self._orphans.list(request_id=request_id):
            reaped = self.reap_now(orphan.id)
            gone += reaped is not None and reaped[1] is None
        return gone

    def abort(self, orphan: Orphan) -> str | None:
        """Abort a claimed orphan and record what happened: None when S3 confirmed the
        upload gone (the row is deleted), else the error (the row is due again later)."""
        extra = {
            "orphan_id": orphan.id,
            "account_id": orphan.account_id,
            "request_id": orphan.request_id,
            "bucket": orphan.bucket,
            "key": orphan.key,
            "upload_id": orphan.upload_id,
            "attempt": orphan.attempts,
        }
        error, detail = self._try_abort(orphan)
        if error is None:
            self._orphans.aborted(orphan.id)
            metrics.ORPHAN_ABORTS.labels("aborted").inc()
            log.info(
                "orphaned multipart upload aborted", extra={"action": "orphan.aborted", **extra}
            )
            return None
        delay = retry.abort_delay(
            orphan.attempts,
            base=self._settings.reap_backoff,
            cap=self._settings.reap_backoff_max,
        )
        self._orphans.retry_later(orphan.id, delay=delay, error=error[:ERROR_CHARS])
        metrics.ORPHAN_ABORTS.labels("failed").inc()
        log.warning(
            "abort of an orphaned multipart upload failed",
            extra={
                "action": "orphan.abort_failed",
                **extra,
                "error": error,
                "detail": detail,
                "retry_in": delay,
            },
        )
        return error

    def _try_abort(self, orphan: Orphan) -> tuple[str | None, str | None]:
        """(error, detail for the log), or (None, None) when S3 confirmed."""
        account = self._accounts.by_id(orphan.account_id)
        if account is None:
            return "the account no longer exists", None
        try:
            client = self._client_for(account)
            err = abort_error(client, orphan.bucket, orphan.key, orphan.upload_id)
        except Exception as exc:
            # A bug or a bad setting must not stop the pass: this orphan waits, the rest go.
            log.exception(
                "abort of an orphaned multipart upload crashed",
                extra={"action": "orphan.abort_crashed", "orphan_id": orphan.id},
            )
            return f"internal error: {type(exc).__name__} (see the worker log)", None
        if err is None:
            return None, None
        return err.message, err.detail
