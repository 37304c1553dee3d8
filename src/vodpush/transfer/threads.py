"""A pool of daemon threads, for S3 calls that may never return.

``concurrent.futures.ThreadPoolExecutor`` joins its threads when the interpreter exits, so a
part upload stuck in a socket that S3 never answers (or answers a byte a minute) would hold
the exit of the whole process for as long as the call lasts. A stopping worker hands such an
upload back and stops waiting for it (the lease guard refuses whatever the thread does
later); these threads are daemons, so the process then exits without them.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["DaemonPool"]

T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class DaemonPool:
    """``submit`` and ``shutdown`` as ThreadPoolExecutor's, on ``workers`` daemon threads."""

    def __init__(self, workers: int, *, name: str) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._work: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._serve, name=f"{name}-{n}", daemon=True)
            for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    def submit(self, fn: Callable[..., T], /, *args: Any) -> Future[T]:
        if self._closed:
            raise RuntimeError("submit after shutdown")
        future: Future[T] = Future()
        self._work.put((future, fn, args))
        return future

    def shutdown(self, wait: bool = True) -> None:
        """No new work; the threads end after the work already queued (cancel those futures
        to skip it). ``wait``: until they have ended."""
        if not self._closed:
            self._closed = True
            for _ in self._threads:
                self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()

    def _serve(self) -> None:
        while (work := self._work.get()) is not None:
            future, fn, args = work
            # The arguments (a part's buffer) must not outlive the call in this frame.
            del work
            if future.set_running_or_notify_cancel():
                try:
                    result = fn(*args)
                except BaseException as exc:
                    future.set_exception(exc)
                else:
                    future.set_result(result)
                    del result
            del future, fn, args

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.shutdown(wait=True)
