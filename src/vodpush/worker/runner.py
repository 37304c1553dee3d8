"""The worker: claims queued requests with a lease, uploads them, records the outcome, and
delivers callbacks.

Threads: the main loop claims work and starts an upload thread for each request (as many
as there are slots); a heartbeat thread renews the leases of running uploads and writes their
progress about once a second; callback threads deliver callbacks so a slow receiver never
holds an upload slot; where the stores have a notification channel (PostgreSQL's LISTEN) a
listener thread wakes the loop. Upload and callback threads are daemons: at shutdown the
loop waits for them only until the grace period is over (see ``worker.shutdown``), then hands
back what still runs and returns, so an S3 call or a receiver that never answers cannot hold
the process. A reaper thread aborts the multipart uploads given up without a
confirmed abort (worker.reaper).

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
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from botocore.client import BaseClient

from vodpush import metrics, sestore
from vodpush.callbacks.delivery import deliver
from vodpush.callbacks.payload import build_delivery
from vodpush.callbacks.schedule import next_delivery
from vodpush.core import records
from vodpush.core.accounts import AccountRecord
from vodpush.core.checkpoint import MultipartCheckpoint, PartLedger, PartRecord
from vodpush.core.clock import utcnow
from vodpush.core.options import REQUEST_OPTIONS
from vodpush.core.requests import Claimed, DueCallback, LeaseLost, State, StoreUnavailable
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
from vodpush.worker import retry
from vodpush.worker.clients import AccountClients
from vodpush.worker.outage import FailureLog, PatientLedger, persist
from vodpush.worker.reaper import ClientFor, Reaper
from vodpush.worker.shutdown import (
    HAND_BACK_SECONDS,
    NOT_STOPPING,
    deadline_after,
    give_up_at,
    time_left,
)

log = logging.getLogger(__name__)

CALLBACK_THREADS = 4
HEARTBEAT_SECONDS = 1.0

# The transfer step: (client, job, ledger, *, threshold, chunksize, concurrency, progress,
# should_stop) -> UploadResult, raising UploadError / UploadInterrupted (see ``upload``).
Uploader = Callable[..., Any]


def object_options(request: Claimed, account: AccountRecord) -> ObjectOptions:
    """How ``request``'s object is stored: the customer chose the ACL, the metadata and the
    object options (REQUEST_OPTIONS, all checked at submit), the account sets encryption
    and the checksum mode. Only the options named there are read from the request's
    stored options: nothing else in them reaches S3."""
    chosen = {name: request.options[name] for name in REQUEST_OPTIONS if name in request.options}
    return ObjectOptions(
        acl=request.acl,
        metadata=request.metadata,
        sse=account.s3.sse,
        sse_kms_key_id=account.s3.sse_kms_key_id,
        checksums=account.s3.checksums,
        **chosen,
    )


class _NotRecorded(Exception):
    """An outcome could not be written: the database stayed unavailable for the whole
    budget. The request stays leased; when the lease runs out, a worker takes it over."""


@dataclass
class _Active:
    """A running upload, as the heartbeat thread and a stopping worker see it."""

    request: Claimed
    bytes_done: int = 0
    bytes_total: int | None = None
    reported: tuple[int, int | None] = (-1, None)
    lost: bool = False
    started: float = field(default_factory=time.monotonic)
    # Under ``lock``: handed back (released) by this worker, or past ledger.confirm(), its
    # final S3 call (PutObject, CompleteMultipartUpload, an abort) perhaps in flight. Never
    # both: a request handed back must not be completed, and one that may be completed must
    # not be handed back (the next worker would upload it again).
    lock: threading.Lock = field(default_factory=threading.Lock)
    released: bool = False
    committing: bool = False
    # Set once the upload's outcome (or release) is being written: from then on (as once
    # it is lost) a claim of the same request is a new attempt, not this one's lease taken
    # back.
    settled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)
    # A new attempt claimed while an earlier one here was still writing its outcome
    # starts when that one has finished.
    after: threading.Event | None = None

    def progress(self, done: int, total: int) -> None:
        if done > self.bytes_done:  # bytes/s on a dashboard: counted as they are sent
            metrics.BYTES_SENT.inc(done - self.bytes_done)
        self.bytes_done, self.bytes_total = done, total


class _GuardedLedger:
    """The request's ledger, with confirm() (the gate before the final S3 call) refused
    once this worker has handed the request back, and marking the upload as committing."""

    def __init__(self, ledger: PartLedger, active: _Active) -> None:
        self._ledger = ledger
        self._active = active

    def load(self) -> MultipartCheckpoint | None:
        return self._ledger.load()

    def begin(self, checkpoint: MultipartCheckpoint) -> None:
        self._ledger.begin(checkpoint)

    def part_done(self, part_number: int, record: PartRecord) -> None:
        self._ledger.part_done(part_number, record)

    def clear(self) -> None:
        self._ledger.clear()

    def give_up(self) -> None:
        self._ledger.give_up()

    def confirm(self) -> None:
        with self._active.lock:
            if self._active.released:
                raise LeaseLost(f"request {self._active.request.id} was handed back")
            self._ledger.confirm()
            self._active.committing = True


@dataclass
class _Delivering:
    """A callback being delivered; ``settled`` (under ``lock``) once its attempt is recorded
    or about to be, by the delivering thread or by a worker giving up at shutdown."""

    due: DueCallback
    at: datetime = field(default_factory=utcnow)
    started: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    settled: bool = False

    def settle(self) -> bool:
        """True for the one caller that is to record the attempt."""
        with self.lock:
            first, self.settled = not self.settled, True
            return first


class Worker:
    def __init__(
        self,
        service: Service,
        *,
        concurrency: int | None = None,
        uploader: Uploader = upload,
        clients: ClientFor | None = None,
    ) -> None:
        """``clients(account)``: the account's S3 client (default: ``AccountClients``)."""
        self.service = service
        self._transfer = uploader
        self.settings = service.settings
        self.queue = service.queue
        self.concurrency = concurrency or self.settings.worker_concurrency
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._stopping = threading.Event()
        self._deadline = NOT_STOPPING  # monotonic time after which uploads are interrupted
        self._wakeup = threading.Event()
        self._slots = threading.Semaphore(self.concurrency)
        self._callback_slots = threading.Semaphore(CALLBACK_THREADS)
        self._active: dict[int, _Active] = {}
        metrics.UPLOADS_IN_FLIGHT.set_function(lambda: len(self._active))
        metrics.configure(per_account=self.settings.metrics_per_account)
        self._delivering: dict[int, _Delivering] = {}
        # Due callbacks are looked for when one may just have become due (an upload with a
        # callback ended, a delivery slot freed) and otherwise once a poll interval, not
        # after every upload.
        self._callback_news = threading.Event()
        self._next_callback_poll = 0.0
        self._lock = threading.Lock()
        # One client per set of credentials, not per account (transfer.clients).
        self._clients: ClientFor = clients or AccountClients(self.settings)
        self._reaper = Reaper(service, self._clients)
        # Calls repeated all the time: during a database outage each logs a line when it
        # starts failing, one every 30 s while it goes on, and one when it works again.
        self._claim_errors = FailureLog("claim", action="worker.claim_error")
        self._callback_claim_errors = FailureLog("claim_callback", action="callback.claim_error")
        self._heartbeat_errors = FailureLog("heartbeat", action="worker.heartbeat_error")

    # -- lifecycle --------------------------------------------------------------------------

    def wake(self) -> None:
        """New work may be there (an API in this process just queued a request)."""
        self._wakeup.set()

    @property
    def stop_requested(self) -> bool:
        """stop() was called (a signal): not a burst that ran out of work."""
        return self._deadline != NOT_STOPPING

    def stop(self, grace: float | None = None) -> None:
        """Stop claiming; running uploads get ``grace`` seconds to finish, then are
        interrupted and released for another worker (they resume from their parts); run()
        returns at the latest SETTLE_SECONDS later, leaving behind what did not end."""
        grace = self.settings.shutdown_grace if grace is None else grace
        # A second stop (a second signal, or the server's own shutdown after one) can only
        # bring the deadline nearer, never push it away.
        deadline = deadline_after(time.monotonic(), grace, self._deadline)
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
        heartbeat = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
        heartbeat.start()
        # Not waited for (a burst run does not wait for S3 to come back): a reaper stopped
        # mid-abort leaves its claim to run out, and the orphan is tried again after it.
        threading.Thread(
            target=self._reaper.run, args=(self._stopping,), name="reaper", daemon=True
        ).start()
        if self.service.notifications is not None:
            threading.Thread(
                target=self.service.notifications.listen,
                args=(self._wakeup.set, self._stopping),
                name="listen",
                daemon=True,
            ).start()
        try:
            while not self._stopping.is_set():
                claimed = self._claim_uploads()
                if self._callback_news.is_set() or time.monotonic() >= self._next_callback_poll:
                    self._callback_news.clear()
                    self._next_callback_poll = time.monotonic() + self.settings.poll_interval
                    self._claim_callbacks()
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
            self._wind_down()
            log.info("worker stopped", extra={"action": "worker.stopped", "owner": self.owner})

    def _has_work(self) -> bool:
        try:
            return self.queue.has_work()
        except StoreUnavailable as exc:
            self._claim_errors.failed(exc)
            return True  # unknown: a burst worker waits for the database to tell

    def _wind_down(self) -> None:
        """Wait for running uploads and callbacks: until they end, or after a stop() until
        give_up_at(deadline) (recomputed: a second stop brings it nearer); then hand back
        what still runs, and leave its threads behind."""
        while True:
            with self._lock:
                if not self._active and not self._delivering:
                    return
            give_up = give_up_at(self._deadline)
            now = time.monotonic()
            if now >= give_up:
                break
            self._wakeup.wait(min(time_left(give_up, now), 0.1))
            self._wakeup.clear()
        with self._lock:
            uploads = list(self._active.values())
            callbacks = list(self._delivering.values())
        log.warning(
            "grace period over: handing back what still runs",
            extra={
                "action": "worker.give_up",
                "owner": self.owner,
                "uploads": [a.request.id for a in uploads],
                "callbacks": [d.due.id for d in callbacks],
            },
        )
        # Each hand-back is a database write (or waits for an upload thread that is in
        # one): on threads of their own, waited for HAND_BACK_SECONDS at most, so a
        # database that is away or slow cannot hold the exit. What is not handed back by
        # then is left to its lease.
        hand_backs = [
            threading.Thread(
                target=self._give_up_upload, args=(a,), name="give-up-upload", daemon=True
            )
            for a in uploads
        ] + [
            threading.Thread(
                target=self._give_up_callback, args=(d,), name="give-up-callback", daemon=True
            )
            for d in callbacks
        ]
        for thread in hand_backs:
            thread.start()
        until = time.monotonic() + HAND_BACK_SECONDS
        for thread in hand_backs:
            thread.join(time_left(until, time.monotonic()))
        if any(thread.is_alive() for thread in hand_backs):
            log.warning(
                "hand-back not finished (database slow or away): left to the leases",
                extra={"action": "worker.give_up_unfinished", "owner": self.owner},
            )

    def _claim_uploads(self) -> bool:
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
            threading.Thread(
                target=self._run_upload, args=(active,), name=f"upload-{request.id}", daemon=True
            ).start()
        return claimed

    def _callbacks_running(self) -> bool:
        with self._lock:
            return bool(self._delivering)

    def _claim_callbacks(self) -> None:
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
            delivering = _Delivering(due)
            with self._lock:
                self._delivering[due.id] = delivering
            threading.Thread(
                target=self._run_callback,
                args=(delivering,),
                name=f"callback-{due.id}",
                daemon=True,
            ).start()

    # -- uploads ---------------------------------------------------------------------------

    @property
    def _callback_lease(self) -> float:
        return self.settings.callback_timeout * 3

    def _should_stop(self, active: _Active) -> bool:
        return active.lost or active.released or self._past_deadline()

    def _past_deadline(self) -> bool:
        return time.monotonic() > self._deadline

    def _past_give_up(self) -> bool:
        return time.monotonic() >= give_up_at(self._deadline)

    def _record(
        self, active: _Active, operation: str, call: Callable[[], Any], extra: dict[str, Any]
    ) -> Any:
        """A write of an upload's outcome (or a release), tried again through a database
        outage for up to the lease length, or until a stopping worker gives up on what
        still runs (give_up_at); then _NotRecorded. A late try of a request another worker
        took over is LeaseLost."""
        active.settled = True
        try:
            return persist(
                operation,
                call,
                budget=self.settings.lease_seconds,
                give_up=self._past_give_up,
                extra=extra,
            )
        except StoreUnavailable as exc:
            raise _NotRecorded(str(exc)) from exc

    def _release(self, active: _Active, extra: dict[str, Any]) -> bool:
        """Hand the request back (queued, the attempt not counted), once. False when that
        is not done: already handed back, or its final S3 call may be in flight. The write
        rides out a database outage (``_record``: _NotRecorded when it could not)."""
        with active.lock:
            if active.released or active.committing:
                return False
            self._record(
                active,
                "release",
                functools.partial(self.queue.release, active.request.id, self.owner),
                extra,
            )
            active.released = True
        return True

    def _give_up_upload(self, active: _Active) -> None:
        """At give_up_at: the upload did not end (an S3 call that does not return). Hand its
        request back for another worker and stop waiting; the lease guard refuses whatever
        its thread tries later. One in its final call keeps its lease (the call may still
        land): the lease runs out after the process is gone, and the next holder takes over."""
        request = active.request
        extra = {"request_id": request.id, "account_id": request.account_id}
        try:
            released = self._release(active, extra)
        except Exception:  # LeaseLost, or the database is away: the lease runs out anyway
            log.exception("hand-back failed", extra={"action": "upload.release_failed", **extra})
            return
        if released:
            with self._lock:
                if self._active.get(request.id) is active:
                    del self._active[request.id]  # no more heartbeats for it
            log.info(
                "upload released for another worker; its S3 call is abandoned",
                extra={"action": "upload.released", **extra, "abandoned": True},
            )
        elif active.committing and not active.released:
            log.warning(
                "upload in its final S3 call at shutdown: left to its lease",
                extra={"action": "upload.in_doubt", **extra},
            )

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
                if not active.released:  # else: handed back already, nothing to write
                    self._store_failed(active, exc, extra)
            except (LeaseLost, _NotRecorded):
                raise
            except Exception:
                # A bug. Never let it leave the request leased forever: record it. If the
                # lease is gone (another worker took over meanwhile), nothing is recorded:
                # said below.
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
                metrics.upload_finished("error", request.account_id)
        except LeaseLost:
            # Else (released): the refused write of an abandoned upload.
            if not active.released and not self._canceled(active, extra):
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

    def _canceled(self, active: _Active, extra: dict[str, Any]) -> bool:
        """After a lost lease: True when it was lost to a cancel (aws.cancel). The upload
        has stopped (its part threads are done: the transfer returned), so the multipart
        upload the cancel recorded as an orphan is aborted now, not at the reaper's next
        pass. Any trouble here leaves that to the reaper."""
        request = active.request
        try:
            row = self.service.requests.get(request.id)
        except Exception:  # the database cannot tell now: reported as a lost lease
            return False
        if row is None or row.state != State.CANCELED.value:
            return False
        metrics.UPLOADS.labels("canceled").inc()
        log.info("upload canceled", extra={"action": "upload.canceled", **extra})
        try:
            self._reaper.reap_request(request.id)
        except Exception as exc:
            log.warning(
                "multipart upload of a canceled request left to the reaper",
                extra={"action": "upload.cancel_cleanup_failed", "error": str(exc), **extra},
            )
        return True

    def _store_failed(self, active: _Active, exc: StoreUnavailable, extra: dict[str, Any]) -> None:
        """The attempt met a database error that passes: try the request again soon, from
        its checkpoint, without counting the attempt. Never a failure."""
        request = active.request
        decision = retry.after_store_error(
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
        )
        delay = decision.delay or 0.0
        at = self._record(
            active,
            "retry_later",
            functools.partial(
                self.queue.retry_later,
                request.id,
                self.owner,
                delay=delay,
                cause="the database was unavailable",
                max_attempts=self.settings.max_attempts,
                http_status=None,
                code="StoreUnavailable",
                refund_attempt=True,
            ),
            extra,
        )
        metrics.upload_finished("retry", request.account_id)
        log.warning(
            "upload will be retried: database unavailable",
            extra={
                "action": "upload.retry",
                **extra,
                "error": str(exc),
                "code": "StoreUnavailable",
                "delay": round(delay, 3),
                "next_attempt_at": at.isoformat(sep=" ", timespec="seconds"),
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
            # An earlier attempt may have written the object and died (or lost the answer)
            # before its success was recorded: look before writing a second version.
            may_exist=request.attempts > 1 or request.lease_expiries > 0,
        )
        client = self._clients(account)
        ledger = _GuardedLedger(
            PatientLedger(
                self.service.ledger(request.id, self.owner, empty=not request.has_checkpoint),
                # A database outage pauses the upload for up to the lease length, then ends
                # the attempt (StoreUnavailable: tried again later, from the checkpoint).
                budget=self.settings.lease_seconds,
                lost=lambda: active.lost or active.released,
                give_up=self._past_deadline,
                extra=extra,
            ),
            active,
        )
        if request.lease_expiries >= self.settings.max_lease_expiries:
            # Every worker that took it died or hung (a crash, the OOM killer): end it
            # rather than hand it to the next one, and leave no multipart upload behind
            # (one whose abort fails is recorded by fail() for the reaper).
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
            if self._release(active, extra):
                log.info(
                    "upload released for another worker",
                    extra={"action": "upload.released", **extra},
                )
            return
        except UploadError as err:
            # A stopping worker does not judge a transient failure (S3 away as it stops):
            # the request goes back uncounted, and the next worker retries it at once.
            if err.transient and self.stop_requested and self._release(active, extra):
                log.info(
                    "upload released for another worker after a transient error",
                    extra={"action": "upload.released", **extra, "error": err.message},
                )
                return
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
                completed_upload=result.completed_upload_id,
            ),
            extra,
        )
        elapsed = time.monotonic() - active.started
        metrics.upload_finished("success", request.account_id, size=result.size)
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
            self._release(active, extra)
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
        decision = retry.decide(
            transient=err.transient,
            attempts_made=request.attempts,
            max_attempts=self.settings.max_attempts,
            base_delay=self.settings.retry_base_delay,
            max_delay=self.settings.retry_max_delay,
        )
        if decision.retry and decision.delay is not None:  # a retry always says when
            delay = decision.delay
            # The store puts the delay on its own clock and writes "Retrying at <time>".
            at = self._record(
                active,
                "retry_later",
                functools.partial(
                    self.queue.retry_later,
                    request.id,
                    self.owner,
                    delay=delay,
                    cause=err.message,
                    max_attempts=self.settings.max_attempts,
                    http_status=err.http_status,
                    code=err.code,
                ),
                extra,
            )
            metrics.upload_finished("retry", request.account_id)
            log.warning(
                "upload will be retried",
                extra={
                    "action": "upload.retry",
                    **extra,
                    "error": err.message,
                    "detail": err.detail,
                    "delay": round(delay, 3),
                    "next_attempt_at": at.isoformat(sep=" ", timespec="seconds"),
                    "attempt": request.attempts,
                    "max_attempts": self.settings.max_attempts,
                    "code": err.code,
                },
            )
            return
        if err.transient:
            # Out of attempts: the multipart upload will never resume, so abort it now
            # rather than leave its parts in the bucket. If S3 does not confirm (it is
            # down), the checkpoint stays and fail() hands its upload id to the reaper.
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
        metrics.upload_finished("failure", request.account_id)
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

    def _run_callback(self, delivering: _Delivering) -> None:
        due = delivering.due
        extra = {"request_id": due.id, "account_id": due.account_id}
        try:
            self._deliver(delivering, extra)
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
                self._delivering.pop(due.id, None)
            self._callback_slots.release()
            self._callback_ready()  # the freed slot may take another due callback

    def _give_up_callback(self, delivering: _Delivering) -> None:
        """At give_up_at: the receiver has not answered. Record the attempt (the receiver may
        have read the POST) as cut by the shutdown, due again at once for another worker
        (same message id: the receiver can tell a repeat), unless the schedule is used up."""
        if not delivering.settle():
            return  # its thread is recording the outcome
        due = delivering.due
        extra = {"request_id": due.id, "account_id": due.account_id}
        seconds = time.monotonic() - delivering.started
        decision = next_delivery(due.attempts + 1, self.settings.callback_schedule)
        try:
            state = self.queue.record_callback(
                due.id,
                msg_id=due.msg_id,
                at=delivering.at,
                ok=False,
                http_status=None,
                error=f"interrupted by shutdown: no answer after {seconds:.1f} s",
                duration=seconds,
                next_delay=0.0 if decision.retry else None,
            )
        except Exception:  # the callback is due again when its claim runs out
            log.exception(
                "could not record the interrupted callback",
                extra={"action": "callback.record_failed", **extra},
            )
            return
        log.warning(
            "callback interrupted by shutdown",
            extra={"action": f"callback.{state}", **extra, "interrupted": True},
        )

    def _deliver(self, delivering: _Delivering, extra: dict[str, Any]) -> None:
        due = delivering.due
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
        if not delivering.settle():
            return  # recorded as interrupted by a worker that stopped waiting for it
        decision = next_delivery(due.attempts + 1, self.settings.callback_schedule)
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
                next_delay=decision.delay if decision.retry else None,
                permanent=attempt.permanent,
            ),
            budget=self._callback_lease,
            give_up=self._past_give_up,
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
