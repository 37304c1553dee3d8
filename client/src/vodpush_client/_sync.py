"""The synchronous client."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx

from vodpush_client import _protocol as p
from vodpush_client.errors import FiltersUnsupported
from vodpush_client.records import CallbackHistory, Redelivery, StatusPage, StatusRecord

T = TypeVar("T")


class Client(p.ClientBase):
    """A signed-request client for one account (``cdn``, ``api_key``, ``api_secret``);
    ``Client.from_env()`` reads them from ``VODPUSH_*`` variables.

    ``timeout`` (seconds) bounds each step of an HTTP attempt: connecting, sending, and each
    wait for response bytes. ``retries`` is how many times a failed attempt is repeated when
    that is safe, after ``backoff``, ``2*backoff``, ... seconds (at most 5 s).
    ``transport`` replaces the network (an ``httpx.MockTransport`` in tests).
    """

    def __init__(
        self,
        url: str,
        cdn: int,
        api_key: str,
        api_secret: str,
        *,
        timeout: float = p.DEFAULT_TIMEOUT,
        retries: int = p.DEFAULT_RETRIES,
        backoff: float = 0.25,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(
            url,
            cdn,
            api_key,
            api_secret,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            clock=clock,
        )
        self._sleep = sleep
        self._http = httpx.Client(transport=transport, **self._http_options(timeout))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- commands -------------------------------------------------------------------------

    def upload(
        self,
        path: str,
        destination_path: str,
        bucket: str,
        acl: str,
        metadata: Mapping[str, Any] | None = None,
        callback: str = "",
        *,
        idempotency_key: str | None = None,
        content_type: str | None = None,
        storage_class: str | None = None,
        tags: Mapping[str, Any] | None = None,
        cache_control: str | None = None,
        content_disposition: str | None = None,
        preflight: bool = False,
    ) -> int:
        """Queue ``path`` (``sestore<N>/<user>/...``) for upload to ``bucket`` as
        ``destination_path``; returns the request id. ``acl`` is ``private``,
        ``public-read`` or ``bucket-default``; the keyword options are sent only when given
        (see the API documentation of aws.upload).

        With an ``idempotency_key`` the same upload submitted again within 24 h answers the
        first request's id, so a retry may be signed afresh: this client then keeps
        retrying a lost answer past the 60 s in which it otherwise only resends the same
        signed body.

        With ``preflight`` the server first checks the bucket would take the upload
        (ApiError code 0008 naming the cause if not; nothing is queued then)."""
        return self._run(
            p.upload_call(
                path,
                destination_path,
                bucket,
                acl,
                metadata,
                callback,
                idempotency_key=idempotency_key,
                content_type=content_type,
                storage_class=storage_class,
                tags=tags,
                cache_control=cache_control,
                content_disposition=content_disposition,
                preflight=preflight,
            )
        )

    def status(
        self,
        limit: int = 25,
        offset: int = 0,
        id: int | None = None,
        *,
        state: str | Iterable[str] | None = None,
        created_from: datetime | str | int | None = None,
        created_to: datetime | str | int | None = None,
        bucket: str | None = None,
        path_prefix: str | None = None,
        after_id: int | None = None,
    ) -> StatusPage:
        """One page of the account's requests, newest first (or just request ``id``).

        The filters (all of them together): ``state``, one or a list of queued, running,
        retrying, succeeded, failed, canceled; ``created_from`` and ``created_to``, both
        inclusive, to the second (datetimes, naive meaning UTC; 'YYYY-MM-DD HH:MM:SS' UTC;
        or unix seconds); ``bucket``; ``path_prefix``, the start of the source path,
        exactly. ``after_id`` continues a listing below the last id of a page (keyset
        paging; ``offset`` must then be 0). With any of these the page has its ``total``;
        a server that ignores them raises FiltersUnsupported.
        """
        filters = p.filter_fields(
            state=state,
            created_from=created_from,
            created_to=created_to,
            bucket=bucket,
            path_prefix=path_prefix,
            after_id=after_id,
        )
        return self._run(p.status_call(self.url, limit, offset, id, filters))

    def get(self, id: int) -> StatusRecord:
        """Request ``id``; :class:`RequestNotFound` when the account has no such request."""
        return p.found(self.status(limit=1, id=id), id)

    def cancel(self, id: int) -> StatusRecord:
        """``aws.cancel``: stop request ``id`` (queued, running or retrying); its record,
        now ``canceled``. :class:`ApiError` (code 0007) when the account has no such
        request, or it has finished or is finishing."""
        return self._run(p.change_call("aws.cancel", id))

    def retry(self, id: int) -> StatusRecord:
        """``aws.retry``: queue request ``id`` (failed or canceled) again; its record, now
        ``queued`` with its attempts from 0. :class:`ApiError` (code 0007) when the
        account has no such request, or it is not failed or canceled."""
        return self._run(p.change_call("aws.retry", id))

    def callbacks(self, id: int) -> CallbackHistory:
        """The callback of request ``id``: its state and its newest delivery attempts
        (``aws.callbacks``). An id the account does not have is an :class:`ApiError`
        (code 0007, "no such request")."""
        return self._run(p.callbacks_call(id))

    def redeliver(self, id: int) -> Redelivery:
        """Send the callback of finished request ``id`` again, as a new message (a new
        webhook-id) due now (``aws.redeliver``). Refused with an :class:`ApiError`: 0007 for
        a request that is not finished, has no callback or a delivery pending; 1000 past
        the server's redeliveries per hour."""
        return self._run(p.redeliver_call(id))

    def iter_status(
        self,
        page_size: int = 100,
        *,
        state: str | Iterable[str] | None = None,
        created_from: datetime | str | int | None = None,
        created_to: datetime | str | int | None = None,
        bucket: str | None = None,
        path_prefix: str | None = None,
    ) -> Iterator[StatusRecord]:
        """Every request of the account that the filters match (see ``status``), newest
        first, fetched ``page_size`` at a time.

        Each page continues below the last id of the one before (``after_id``), so
        requests queued meanwhile neither repeat nor push others out, and a page deep in
        the list costs what the first does. A server without ``after_id`` is paged by
        offset instead (then filters cannot be asked for).
        """
        pager = p.Pager(
            page_size,
            {
                "state": state,
                "created_from": created_from,
                "created_to": created_to,
                "bucket": bucket,
                "path_prefix": path_prefix,
            },
        )
        while (query := pager.query()) is not None:
            try:
                page = self.status(**query)
            except FiltersUnsupported as error:
                pager.unsupported(error)
                continue
            yield from pager.take(page)

    def wait(
        self,
        id: int,
        *,
        interval: float = p.DEFAULT_WAIT_INTERVAL,
        timeout: float | None = None,
        progress: Callable[[StatusRecord], object] | None = None,
    ) -> StatusRecord:
        """Poll request ``id`` every ``interval`` seconds until it has finished; its final
        record (succeeded, failed or canceled: look at ``.succeeded``). ``progress`` is
        called with every record polled, the final one too (``bytes_done`` of
        ``bytes_total``, ``state``, ``message``). :class:`WaitTimeout` after ``timeout``
        seconds (the request goes on); :class:`RequestNotFound` for an id the account
        does not have."""
        waiter = p.Waiter(interval, timeout)
        while True:
            record = self.get(id)
            if progress is not None:
                progress(record)
            if record.finished:
                return record
            self._sleep(waiter.pause(record))

    # -- the wire -------------------------------------------------------------------------

    def _run(self, call: p.Call[T]) -> T:
        """Send one command, retrying where that is safe (see ``Attempts``); its result."""
        attempts = p.Attempts(self, call)
        body = attempts.body
        while True:
            try:
                return call.parse(self._send(body))
            except p.Retryable as failure:
                self._sleep(attempts.backoff(failure))
                body = attempts.next_body()

    def _send(self, body: str) -> dict[str, Any]:
        try:
            response = self._http.post(self.url, data={"json": body})
        except httpx.TransportError as exc:
            raise p.unreachable(self.url, exc) from exc
        return self._accept(response)
