"""Reads of an in-memory copy run in a worker thread, one at a time per key, with writers held off.

The embedded store loads a classifier's copy from its shard, and freezes a copy for a snapshot,
in a worker thread so that the event loop keeps answering meanwhile (docs/reliability.md). Both
read state that writes change, so the store's writes to that classifier wait until the read is
done (:meth:`SingleFlight.running`, awaited by ``EdgeStore``): writes are few and can wait,
queries cannot. Callers that ask for the same key while its read runs share it rather than
start another.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable
from typing import Any, TypeVar, cast

T = TypeVar("T")


class SingleFlight:
    def __init__(self) -> None:
        self._running: dict[Hashable, asyncio.Future[Any]] = {}

    async def run(
        self, key: Hashable, read: Callable[[], T], keep: Callable[[T], None] | None = None
    ) -> T:
        """``read()`` in a worker thread, or the result of the one already running for ``key``.
        ``keep`` gets a successful result on the event loop as the read ends, before any writer
        waiting for it resumes. A caller's cancellation does not stop the read: the
        thread runs on, and writers wait for it."""
        future = self._running.get(key)
        if future is None:
            future = asyncio.get_running_loop().run_in_executor(None, read)
            self._running[key] = future

            def finished(done: asyncio.Future[Any]) -> None:
                del self._running[key]
                if keep is not None and not done.cancelled() and done.exception() is None:
                    keep(done.result())

            future.add_done_callback(finished)
        return cast(T, await asyncio.shield(future))

    def running(self, keys: Iterable[Hashable]) -> list[asyncio.Future[Any]]:
        """The reads of ``keys`` running now."""
        return [self._running[key] for key in keys if key in self._running]
