"""The asynchronous client: the methods of :class:`~vodpush_client.Client`, awaited, on
``httpx.AsyncClient``. It sleeps with ``asyncio.sleep`` (between retries, and in
``wait()``); under trio, pass ``sleep=trio.sleep``."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from datetime import datetime
from typing import Any, TypeVar

import httpx

from vodpush_client import _protocol as p
from vodpush_client.errors import FiltersUnsupported
from vodpush_client.records import CallbackHistory, Redelivery, StatusPage, StatusRecord

T = TypeVar("T")


class AsyncClient(p.ClientBase):
    """The asynchronous twin of :class:`~vodpush_client.Client`: the same arguments (a
    ``transport`` is an ``httpx.AsyncBaseTransport``, ``sleep`` a coroutine function), the
    same methods and retries, awaited; ``iter_status`` is an async iterator; ``async with``
    closes it, or ``await aclose()``."""

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
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
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
        self._http = httpx.AsyncClient(transport=transport, **self._http_options(timeout))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- commands (documented on Client) --------------------------------------------------

    async def upload(
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
        """``aws.upload``; the request's id (see ``Client.upload``)."""
        return await self._run(
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

    async def status(
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
        """One page of ``aws.status`` (see ``Client.status``)."""
        filters = p.filter_fields(
            state=state,
            created_from=created_from,
            created_to=created_to,
            bucket=bucket,
            path_prefix=path_prefix,
            after_id=after_id,
        )
        return await self._run(p.status_call(self.url, limit, offset, id, filters))

    async def get(self, id: int) -> StatusRecord:
        """Request ``id``; :class:`RequestNotFound` when the account has no such request."""
        return p.found(await self.status(limit=1, id=id), id)

    async def cancel(self, id: int) -> StatusRecord:
        """``aws.cancel`` (see ``Client.cancel``)."""
        return await self._run(p.change_call("aws.cancel", id))

    async def retry(self, id: int) -> StatusRecord:
        """``aws.retry`` (see ``Client.retry``)."""
        return await self._run(p.change_call("aws.retry", id))

    async def callbacks(self, id: int) -> CallbackHistory:
        """``aws.callbacks`` (see ``Client.callbacks``)."""
        return await self._run(p.callbacks_call(id))

    async def redeliver(self, id: int) -> Redelivery:
        """``aws.redeliver`` (see ``Client.redeliver``)."""
        return await self._run(p.redeliver_call(id))

    async def iter_status(
        self,
        page_size: int = 100,
        *,
        state: str | Iterable[str] | None = None,
        created_from: datetime | str | int | None = None,
        created_to: datetime | str | int | None = None,
        bucket: str | None = None,
        path_prefix: str | None = None,
    ) -> AsyncIterator[StatusRecord]:
        """Every request the filters match, newest first (see ``Client.iter_status``)."""
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
                page = await self.status(**query)
            except FiltersUnsupported as error:
                pager.unsupported(error)
                continue
            for record in pager.take(page):
                yield record

    async def wait(
        self,
        id: int,
        *,
        interval: float = p.DEFAULT_WAIT_INTERVAL,
        timeout: float | None = None,
        progress: Callable[[StatusRecord], object] | None = None,
    ) -> StatusRecord:
        """Poll request ``id`` until it has finished; its final record (see
        ``Client.wait``). ``progress`` may also be a coroutine function."""
        waiter = p.Waiter(interval, timeout)
        while True:
            record = await self.get(id)
            if progress is not None and inspect.isawaitable(shown := progress(record)):
                await shown
            if record.finished:
                return record
            await self._sleep(waiter.pause(record))

    # -- the wire -------------------------------------------------------------------------

    async def _run(self, call: p.Call[T]) -> T:
        attempts = p.Attempts(self, call)
        body = attempts.body
        while True:
            try:
                return call.parse(await self._send(body))
            except p.Retryable as failure:
                await self._sleep(attempts.backoff(failure))
                body = attempts.next_body()

    async def _send(self, body: str) -> dict[str, Any]:
        try:
            response = await self._http.post(self.url, data={"json": body})
        except httpx.TransportError as exc:
            raise p.unreachable(self.url, exc) from exc
        return self._accept(response)
