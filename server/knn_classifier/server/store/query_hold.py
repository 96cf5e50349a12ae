"""Large queries of in-memory copies run in worker threads, and writes to a copy wait for them.

Numpy releases the GIL for a query's matrix product and partition, so a query of many vectors
over a large copy leaves the event loop free in a worker thread (docs/reliability.md). It reads
the copy's rows and its id and payload arrays, which a write changes together (rows rewritten
in place and moved on delete), so a write to that copy waits until the queries running end,
and queries asked for while a write waits wait until it has written: writers first, so that a
stream of queries cannot keep a write waiting. Writes are few and short, on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Hashable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class QueryHold:
    def __init__(self) -> None:
        self._running: dict[Hashable, set[asyncio.Future[Any]]] = {}
        self._writers: dict[Hashable, int] = {}
        self._written: dict[Hashable, asyncio.Future[None]] = {}
        """Per key a write waits for, done once none does."""

    async def run(self, key: Hashable, read: Callable[[], T]) -> T:
        """``read()`` in a worker thread, once no write to ``key`` waits. A caller's
        cancellation does not stop the thread, and writes wait for it still: the hold ends
        when the thread does."""
        while (written := self._written.get(key)) is not None:
            await asyncio.wait([written])
        future = asyncio.get_running_loop().run_in_executor(None, read)
        self._running.setdefault(key, set()).add(future)

        def finished(_: asyncio.Future[T]) -> None:
            running = self._running[key]
            running.discard(future)
            if not running:
                del self._running[key]

        future.add_done_callback(finished)
        return await asyncio.shield(future)

    def running(self, keys: Iterable[Hashable]) -> list[asyncio.Future[Any]]:
        """The queries of ``keys`` running now."""
        return [future for key in keys for future in self._running.get(key, ())]

    @contextmanager
    def writing(self, keys: Iterable[Hashable]) -> Iterator[None]:
        """While open, queries of ``keys`` asked for wait. They resume after the step of the
        caller's task that closes it, so a caller that writes without awaiting after closing
        it writes before any of them reads."""
        keys = set(keys)
        for key in keys:
            self._writers[key] = self._writers.get(key, 0) + 1
            if key not in self._written:
                self._written[key] = asyncio.get_running_loop().create_future()
        try:
            yield
        finally:
            for key in keys:
                self._writers[key] -= 1
                if not self._writers[key]:
                    del self._writers[key]
                    self._written.pop(key).set_result(None)
