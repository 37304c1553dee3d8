"""The worker: claims queued requests with a lease, uploads them, records the outcome, and
delivers callbacks.

Threads: the main loop claims work and hands it to an upload pool; a heartbeat thread
renews the leases of running uploads and writes their progress about once a second; a
callback pool delivers callbacks so a slow receiver never holds an upload slot; where the
stores have a notification channel (PostgreSQL's LISTEN) a listener thread wakes the loop.

A database that does not answer for a while (core.requests.StoreUnavailable) is ridden out,
never a failure: worker.outage tries store calls again, and _store_failed retries an attempt
the database cut short without counting it.

The stores are the Service's (core.ports: a database, or vodpush.memory), and the transfer
itself is ``uploader`` (the S3 engine by default): tests/test_runner.py drives this loop on
memory stores with a plain function in its place.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from botocore.client import BaseClient

from vodpush import metrics, sestore
from vodpush.callbacks.delivery import deliver
from vodpush.callbacks.payload import build_delivery
from vodpush.callbacks.schedule import next_delivery
from vodpush.core import records
from vodpush.core.accounts import AccountRecord, S3Settings
from vodpush.core.checkpoint import PartLedger
from vodpush.core.clock import utcnow
from vodpush.core.requests import Claimed, DueCallback, LeaseLost, StoreUnavailable
from vodpush.service import Service
from vodpush.transfer import (
    ObjectOptions,
    UploadError,
    UploadInterrupted,
    UploadJob,
    abandon,
    abandon_quietly,
    upload,
)
from vodpush.transfer.s3client import make_s3_client
from vodpush.worker import retry
from vodpush.worker.outage import FailureLog, PatientLedger, persist

log = logging.getLogger(__name__)

CALLBACK_THREADS = 4
HEARTBEAT_SECONDS = 1.0

# The transfer step: (client, job, ledger, *, threshold, chunksize, concurrency, progress,
# should_stop) -> UploadResult, raising UploadError / UploadInterrupted (see ``upload``).
Uploader = Callable[..., Any]


def object_options(request: Claimed, account: AccountRecord) -> ObjectOptions:
    """How ``request``'s object is stored: the customer chose the ACL and the metadata (both
    checked at submit), the account sets encryption and the checksum mode."""
    return ObjectOptions(
        acl=request.acl,
        metadata=request.metadata,
        sse=account.s3.sse,
        sse_kms_key_id=account.s3.sse_kms_key_id,
        checksums=account.s3.checksums,
    )


class _NotRecorded(Exception):
    """An outcome could not be written: the database stayed unavailable for the whole
    budget. The request stays leased; when the lease runs out, a worker takes it over."""


@dataclass
class _Active:
    """A running upload, as the heartbeat thread sees it."""

    request: Claimed
    bytes_done: int = 0
    bytes_total: int | None = None
    reported: tuple[int, int | None] = (-1, None)
    lost: bool = False
    started: float = field(default_factory=time.monotonic)
    # Set once the upload's outcome (or release) is being written: from then on (as once
    # it is lost) a claim of the same request is a new attempt, not this one's lease taken
    # back.
    settled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    # A new attempt claimed while an earlier one here was still writing its outcome
    # starts when that one has finished.
    after: threading.Event | None = None

    def progress(self, done: int, total: int) -> None:
        self.bytes_done, self.bytes_total = done, total


class Worker:
    def __init__(
        self, service: Service, *, concurrency: int | None = None, uploader: Uploader = upload
    ) -> None:
        self.service = service
        self._transfer = uploader
        self.settings = service.settings
        self.queue = service.queue
        self.concurrency = concurrency or self.settings.worker_concurrency
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping = threading.Event()
        self._deadline = float("inf")  # monotonic time after which uploads are interrupted
        self._wakeup = threading.Event()
        self._slots = threading.Semaphore(self.concurrency)
        self._callback_slots = threading.Semaphore(CALLBACK_THREADS)
        self._active: dict[int, _Active] = {}
        self._callbacks_inflight = 0
        # Due callbacks are looked for when one may just have become due (an upload with a
        # callback ended, a delivery slot freed) and otherwise once a poll interval, not
        # after every upload.
        self._callback_news = threading.Event()
        self._next_callback_poll = 0.0
        self._lock = threading.Lock()
        self._clients: dict[tuple[int, S3Settings], BaseClient] = {}
        # Calls repeated all the time: during a database outage each logs a line when it
        # starts failing, one every 30 s while it goes on, and one when it works again.
        self._claim_errors = FailureLog("claim", action="worker.claim_error")
        self._callback_claim_errors = FailureLog("claim_callback", action="callback.claim_error")
        self._heartbeat_errors = FailureLog("heartbeat", action="worker.heartbeat_error")

    # -- lifecycle --------------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be there (an API in this process just queued a request)."""
        self._wakeup.set()

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; running uploads get ``grace`` seconds to finish, then are
        interrupted and released for another worker (they resume from their parts)."""
        grace = self.settings.shutdown_grace if grace is None else grace
        deadline = time.monotonic() + grace
        # A second stop (a second signal, or the server's own shutdown after one) can only
        # bring the deadline nearer, never push it away.
        if self._stopping.is_set() and deadline >= self._deadline:
            return
        self._deadline = deadline
        self._stopping.set()
        self._wakeup.set()
        log.info("worker stopping", extra={"action": "worker.stop", "grace": grace})

    def run(self, *, burst: bool = False) -> None:
        """Work until stop() (or, with ``burst``, until the queue is empty)."""
        log.info(
            "worker started",
            extra={
                "action": "worker.start",
                "owner": self.owner,
                "concurrency": self.concurrency,
                "burst": burst,
            },
        )
        uploads = ThreadPoolExecutor(self.concurrency, thread_name_prefix="upload")
        callbacks = ThreadPoolExecutor(CALLBACK_THREADS, thread_name_prefix="callback")
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        if self.service.notifications is not None:
            threading.Thread(
                target=self.service.notifications.listen,
                args=(self._wakeup.set, self._stopping),
                name="listen",
                daemon=True,
            ).start()
        try:
            while not self._stopping.is_set():
                claimed = self._claim_uploads(uploads)
                if self._callback_news.is_set() or time.monotonic() >= self._next_callback_poll:
                    self._callback_news.clear()
                    self._next_callback_poll = time.monotonic() + self.settings.poll_interval
                    self._claim_callbacks(callbacks)
                if (
                    burst
                    and not self._active
                    and not self._callbacks_running()
                    and not self._has_work()
                ):
                    break
                if not claimed:
                    self._wakeup.wait(self.settings.poll_interval)
                    self._wakeup.clear()
        finally:
            self._stopping.set()
            uploads.shutdown(wait=True)
            callbacks.shutdown(wait=True)
            log.info("worker stopped", extra={"action": "worker.stopped", "owner": self.owner})

    def _has_work(self) -> bool:
        try:
            return self.queue.has_work()
        except StoreUnavailable as exc:
            self._claim_errors.failed(exc)
            return True  # unknown: a burst worker waits for the database to tell

    def _claim_uploads(self, pool: ThreadPoolExecutor) -> bool:
        claimed = False
        while not self._stopping.is_set() and self._slots.acquire(blocking=False):
            try:
                request = self.queue.claim(self.owner, self.settings.lease_seconds)
            except Exception as exc:
                self._slots.release()
                self._claim_errors.failed(exc)
                return claimed
            self._claim_errors.ok()
            if request is None:
                self._slots.release()
                return claimed
            claimed = True
            with self._lock:
                running = self._active.get(request.id)
                going_on = running is not None and not (running.settled or running.lost)
                if not going_on:
                    active = _Active(request, after=running.finished if running else None)
                    self._active[request.id] = active
            if going_on:
                # Our own upload, whose lease ran out while the database was away (its
                # heartbeats could not renew it): the claim renewed it for us, under the
                # same owner and as the same attempt, so the upload here simply goes on.
                self._slots.release()
                log.info(
                    "lease of a running upload taken back after it ran out",
                    extra={"action": "upload.lease_renewed", "request_id": request.id},
                )
                continue
            log.info(
                "upload claimed",
                extra={
                    "action": "upload.claimed",
                    "request_id": request.id,
                    "account_id": request.account_id,
                    "attempt": request.attempts,
                },
            )
            pool.submit(self._run_upload, active)
        return claimed

    def _callbacks_running(self) -> bool:
        with self._lock:
            return self._callbacks_inflight > 0

    def _claim_callbacks(self, pool: ThreadPoolExecutor) -> None:
        while self._callback_slots.acquire(blocking=False):
            try:
                due = self.queue.claim_callback(lease_seconds=self._callback_lease)
            except Exception as exc:
                self._callback_slots.release()
                self._callback_claim_errors.failed(exc)
                return
            self._callback_claim_errors.ok()
            if due is None:
                self._callback_slots.release()
                return
            with self._lock:
                self._callbacks_inflight += 1
            pool.submit(self._run_callback, due)

    # -- uploads ---------------------------------------------------------------------------

    @property
    def _callback_lease(self) -> float:
        return self.settings.callback_timeout * 3

    def _should_stop(self, active: _Active) -> bool:
        return active.lost or self._past_deadline()

    def _past_deadline(self) -> bool:
        return time.monotonic() > self._deadline

    def _record(
        self, active: _Active, operation: str, call: Callable[[], Any], extra: dict[str, Any]
    ) -> Any:
        """A write of an upload's outcome (or a release), tried again through a database
        outage for up to the lease length, or until the stop grace is over; then
        _NotRecorded. A late try of a request another worker took over is LeaseLost."""
        active.settled = True
        try:
            return persist(
                operation,
                call,
                budget=self.settings.lease_seconds,
                give_up=self._past_deadline,
                extra=extra,
            )
        except StoreUnavailable as exc:
            raise _NotRecorded(str(exc)) from exc

    def _client(self, account: AccountRecord) -> BaseClient:
        key = (account.id, account.s3)
        with self._lock:
            client = self._clients.get(key)
            if client is None:
                client = make_s3_client(
                    account.s3, max_pool_connections=max(16, self.settings.part_concurrency * 2)
                )
                self._clients[key] = client
            return client

    def _run_upload(self, active: _Active) -> None:
        request = active.request
        extra = {"request_id": request.id, "account_id": request.account_id}
        try:
            if active.after is not None:
                active.after.wait()
            try:
                self._upload(active, extra)
            except StoreUnavailable as exc:
                # Met during the attempt (not in writing its outcome): nothing is wrong
                # with the upload, and its multipart upload and checkpoint are kept.
                self._store_failed(active, exc, extra)
            except (LeaseLost, _NotRecorded):
                raise
            except Exception:
                # A bug. Never let it leave the request leased forever: record it.
                log.exception("upload crashed", extra={"action": "upload.crashed", **extra})
                self._record(
                    active,
                    "fail",
                    functools.partial(
                        self.queue.fail,
                        request.id,
                        self.owner,
                        message="Upload failed: internal error (see the server log)",
                        http_status=None,
                        code="InternalError",
                        has_callback=bool(request.callback),
                    ),
                    extra,
                )
                metrics.UPLOADS.labels("error").inc()
        except LeaseLost:
            log.warning(
                "lease lost; another worker has the request",
                extra={"action": "upload.lease_lost", **extra},
            )
        except _NotRecorded as exc:
            log.error(
                "outcome not recorded: the database stayed unavailable; the request stays "
                "leased and is taken over (resumed) when its lease runs out",
                extra={"action": "upload.not_recorded", "error": str(exc), **extra},
            )
        finally:
            with self._lock:
                if self._active.get(request.id) is active:
                    del self._active[request.id]
            active.finished.set()
            self._slots.release()
            self._wakeup.set()

    def _store_failed(self, active: _Active, exc: StoreUnavailable, extra: dict[str, Any]) -> None:
        """The attempt met a database error that passes: try the request again soon, from
        its checkpoint, without counting the attempt. Never a failure."""
        request = active.request
        now = utcnow()
        decision = retry.after_store_error(
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
            now=now,
        )
        at = decision.at or now
        delay = (at - now).total_seconds()
        self._record(
            active,
            "retry_later",
            functools.partial(
                self.queue.retry_later,
                request.id,
                self.owner,
                at=at,
                message=f"Retrying in {delay:.0f} s: the database was unavailable",
                http_status=None,
                code="StoreUnavailable",
                refund_attempt=True,
            ),
            extra,
        )
        metrics.UPLOADS.labels("retry").inc()
        log.warning(
            "upload will be retried: database unavailable",
            extra={
                "action": "upload.retry",
                **extra,
                "error": str(exc),
                "code": "StoreUnavailable",
                "delay": round(delay, 3),
                "attempt": request.attempts,
            },
        )

    def _upload(self, active: _Active, extra: dict[str, Any]) -> None:
        request = active.request
        account = self.service.accounts.by_id(request.account_id)
        if account is None:
            self._fail(
                active, "Upload failed: the account no longer exists", None, "NoSuchAccount", extra
            )
            return
        if self._refused_for_account(active, account, extra):
            return
        job = UploadJob(
            # Opened (race-free, beneath the user's directory) by the uploader at the start
            # of the attempt and closed by it whatever happens; a refusal fails the request
            # as "source file unavailable" (SourceUnavailable) and aborts any multipart
            # upload an earlier attempt left.
            source=functools.partial(
                sestore.open_source,
                self.settings.sestore_root,
                request.path,
                account.username,
                follow_symlinks=self.settings.sestore_follow_symlinks,
            ),
            bucket=request.bucket,
            key=request.destination_path,
            options=object_options(request, account),
        )
        client = self._client(account)
        ledger = PatientLedger(
            self.service.ledger(request.id, self.owner, empty=not request.has_checkpoint),
            # A database outage pauses the upload for up to the lease length, then ends the
            # attempt (StoreUnavailable: tried again later, from the checkpoint).
            budget=self.settings.lease_seconds,
            lost=lambda: active.lost,
            give_up=self._past_deadline,
            extra=extra,
        )
        if request.lease_expiries >= self.settings.max_attempts:
            # Every worker that took it died or hung (a crash, the OOM killer): end it
            # rather than hand it to the next one, and leave no multipart upload behind.
            abandon_quietly(client, job, ledger)
            self._fail(
                active,
                f"Upload failed: worker died while uploading ({request.lease_expiries} times)",
                None,
                "WorkerDied",
                extra,
            )
            return
        log.info("upload started", extra={"action": "upload.started", **extra})
        try:
            result = self._transfer(
                client,
                job,
                ledger,
                threshold=self.settings.multipart_threshold,
                chunksize=self.settings.multipart_chunksize,
                concurrency=self.settings.part_concurrency,
                progress=active.progress,
                should_stop=lambda: self._should_stop(active),
            )
        except UploadInterrupted:
            if active.lost:
                raise LeaseLost(f"request {request.id}") from None
            self._record(
                active,
                "release",
                functools.partial(self.queue.release, request.id, self.owner),
                extra,
            )
            log.info(
                "upload released for another worker", extra={"action": "upload.released", **extra}
            )
            return
        except UploadError as err:
            self._upload_failed(active, err, client, job, ledger, extra)
            return
        self._record(
            active,
            "succeed",
            functools.partial(
                self.queue.succeed,
                request.id,
                self.owner,
                results=result.results,
                http_status=result.http_status,
                sha256=result.sha256,
                size=result.size,
                has_callback=bool(request.callback),
            ),
            extra,
        )
        elapsed = time.monotonic() - active.started
        metrics.UPLOADS.labels("success").inc()
        metrics.UPLOADED_BYTES.inc(result.size)
        metrics.UPLOAD_SECONDS.observe(elapsed)
        log.info(
            "upload succeeded",
            extra={
                "action": "upload.succeeded",
                **extra,
                "bytes": result.size,
                "seconds": round(elapsed, 3),
                "parts_sent": result.parts_sent,
                "parts_total": result.parts_total,
            },
        )
        if request.callback:
            self._callback_ready()

    def _refused_for_account(
        self, active: _Active, account: AccountRecord, extra: dict[str, Any]
    ) -> bool:
        """Checks against the account as it is now (it may have changed since submit);
        True when the request was handled here and must not be uploaded."""
        request = active.request
        if not account.enabled:
            # Disabled between the claim and now: hold it again, it resumes on enable.
            self._record(
                active,
                "release",
                functools.partial(self.queue.release, request.id, self.owner),
                extra,
            )
            log.info("upload held: account disabled", extra={"action": "upload.held", **extra})
            return True
        refused = account.may_use_bucket(request.bucket)
        if refused is not None:
            self._fail(active, f"Upload failed: {refused}", None, "BucketNotAllowed", extra)
            return True
        refused = account.files_refused()
        if refused is not None:
            self._fail(active, f"Upload failed: {refused}", None, "UsernameShared", extra)
            return True
        return False

    def _upload_failed(
        self,
        active: _Active,
        err: UploadError,
        client: BaseClient,
        job: UploadJob,
        ledger: PartLedger,
        extra: dict[str, Any],
    ) -> None:
        request = active.request
        now = utcnow()
        decision = retry.decide(
            transient=err.transient,
            attempts_made=request.attempts,
            max_attempts=self.settings.max_attempts,
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
            now=now,
        )
        if decision.retry and decision.at is not None:  # a retry always says when
            delay = (decision.at - now).total_seconds()
            self._record(
                active,
                "retry_later",
                functools.partial(
                    self.queue.retry_later,
                    request.id,
                    self.owner,
                    at=decision.at,
                    message=(
                        f"Retrying in {delay:.0f} s after attempt {request.attempts} of "
                        f"{self.settings.max_attempts}: {err.message}"
                    ),
                    http_status=err.http_status,
                    code=err.code,
                ),
                extra,
            )
            metrics.UPLOADS.labels("retry").inc()
            log.warning(
                "upload will be retried",
                extra={
                    "action": "upload.retry",
                    **extra,
                    "error": err.message,
                    "detail": err.detail,
                    "delay": round(delay, 3),
                    "attempt": request.attempts,
                },
            )
            return
        if err.transient:
            # Out of attempts: the multipart upload will never resume, so abort it now
            # rather than leave its parts in the bucket.
            abandon(client, job, ledger)
        self._fail(
            active,
            f"Upload failed: {err.message}",
            err.http_status,
            err.code,
            extra,
            detail=err.detail,
        )

    def _fail(
        self,
        active: _Active,
        message: str,
        http_status: int | None,
        code: str | None,
        extra: dict[str, Any],
        *,
        detail: str | None = None,
    ) -> None:
        request = active.request
        self._record(
            active,
            "fail",
            functools.partial(
                self.queue.fail,
                request.id,
                self.owner,
                message=message,
                http_status=http_status,
                code=code,
                has_callback=bool(request.callback),
            ),
            extra,
        )
        metrics.UPLOADS.labels("failure").inc()
        log.warning(
            "upload failed",
            extra={
                "action": "upload.failed",
                **extra,
                "error": message,
                "code": code,
                "detail": detail,
            },
        )
        if request.callback:
            self._callback_ready()

    # -- heartbeats ------------------------------------------------------------------------

    def _heartbeat_loop(self) -> None:
        while not (self._stopping.is_set() and not self._active):
            time.sleep(HEARTBEAT_SECONDS)
            with self._lock:
                running = list(self._active.values())
            for active in running:
                self._beat(active)

    def _beat(self, active: _Active) -> None:
        progress = (active.bytes_done, active.bytes_total)
        changed = progress != active.reported
        try:
            self.queue.heartbeat(
                active.request.id,
                self.owner,
                self.settings.lease_seconds,
                bytes_done=progress[0] if changed else None,
                bytes_total=progress[1] if changed else None,
            )
            active.reported = progress
        except LeaseLost:
            active.lost = True
        except Exception as exc:
            # A database hiccup: the lease is long enough to try again next beat (and if
            # it runs out meanwhile, our next claim takes it back: _claim_uploads).
            self._heartbeat_errors.failed(exc, request_id=active.request.id)
        else:
            self._heartbeat_errors.ok()

    # -- callbacks -------------------------------------------------------------------------

    def _callback_ready(self) -> None:
        self._callback_news.set()
        self._wakeup.set()

    def _run_callback(self, due: DueCallback) -> None:
        extra = {"request_id": due.id, "account_id": due.account_id}
        try:
            self._deliver(due, extra)
        except LeaseLost:
            pass
        except StoreUnavailable as exc:
            # Before the POST (reading what to send), or in recording it after tries for
            # the whole callback lease: it is due again when that lease runs out, and is
            # then sent with the same webhook-id.
            log.warning(
                "callback not finished: database unavailable; due again after its lease",
                extra={"action": "callback.store_unavailable", "error": str(exc), **extra},
            )
        except Exception:
            log.exception("callback crashed", extra={"action": "callback.crashed", **extra})
        finally:
            with self._lock:
                self._callbacks_inflight -= 1
            self._callback_slots.release()
            self._callback_ready()  # the freed slot may take another due callback

    def _deliver(self, due: DueCallback, extra: dict[str, Any]) -> None:
        account = self.service.accounts.by_id(due.account_id)
        row = self.service.requests.get(due.id)
        if account is None or row is None or not account.enabled:
            return  # a disabled account's callback is due again after the lease, and held
        msg_id = due.msg_id  # fixed by the store when the callback became due; never made here
        delivery = build_delivery(
            records.render(row), self.service.accounts.webhook_secret(account), msg_id, time.time()
        )
        attempt = deliver(
            delivery,
            due.callback,
            timeout=self.settings.callback_timeout,
            allow_private=self.settings.callback_allow_private,
        )
        decision = next_delivery(due.attempts + 1, self.settings.callback_schedule, utcnow())
        # The POST was made: record it through a database outage, for up to the callback
        # lease (after it another deliverer may send it again, with the same webhook-id).
        state = persist(
            "record_callback",
            functools.partial(
                self.queue.record_callback,
                due.id,
                msg_id=msg_id,
                at=attempt.at.replace(tzinfo=None),
                ok=attempt.ok,
                http_status=attempt.http_status,
                error=attempt.error,
                duration=attempt.duration,
                next_at=decision.at.replace(tzinfo=None)
                if decision.retry and decision.at
                else None,
                permanent=attempt.permanent,
            ),
            budget=self._callback_lease,
            give_up=self._past_deadline,
            extra=extra,
        )
        metrics.CALLBACKS.labels("delivered" if attempt.ok else "failed").inc()
        log.info(
            "callback attempt",
            extra={
                "action": f"callback.{state}",
                **extra,
                "http_status": attempt.http_status,
                "error": attempt.error,
                "attempt": due.attempts + 1,
            },
        )
