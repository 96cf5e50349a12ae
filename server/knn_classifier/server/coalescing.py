"""Coalescing: concurrent Classify calls share embedding calls.

Each waiting request joins a queue. One worker sends the queue's texts as one call whenever a
call slot is free (at most ``max_concurrent_calls`` in flight), up to ``max_texts_per_call``
texts. An idle service therefore adds no latency, while a busy one sends few large calls: the
requests that arrive while every slot is busy ride together in the next call. The queue is
bounded: a request that does not fit is refused at once with RESOURCE_EXHAUSTED, and a request
whose deadline passed while it waited is never sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from . import deadlines
from .embedding import Matrix
from .errors import DeadlineExceeded, ResourceExhausted

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiting:
    texts: Sequence[str]
    future: asyncio.Future[Matrix]
    deadline: float | None
    """The caller's deadline on the event loop's clock (None: none)."""


class Coalescer:
    def __init__(
        self,
        embed: Callable[[Sequence[str]], Awaitable[Matrix]],
        max_texts_per_call: int,
        max_concurrent_calls: int,
        max_queued_texts: int,
    ) -> None:
        self._embed = embed
        self._max_texts = max_texts_per_call
        self._max_queued = max_queued_texts
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        self._queue: deque[_Waiting] = deque()
        self._queued_texts = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self.calls_made = 0

    async def embed(self, texts: Sequence[str]) -> Matrix:
        """The full-width vectors of ``texts``, embedded together with other waiting requests."""
        if self._queued_texts + len(texts) > self._max_queued:
            raise ResourceExhausted(
                f"the embedding queue is full ({self._queued_texts} texts waiting, limit "
                f"{self._max_queued}); retry with backoff"
            )
        deadlines.check("queueing for the embedding server")
        left = deadlines.remaining()
        loop = asyncio.get_running_loop()
        waiting = _Waiting(
            texts, loop.create_future(), None if left is None else loop.time() + left
        )
        self._queue.append(waiting)
        self._queued_texts += len(texts)
        self._arrived.set()
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await waiting.future

    async def close(self) -> None:
        tasks = [t for t in (self._worker, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            task = asyncio.create_task(self._send(batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    def _take(self) -> list[_Waiting]:
        """Up to max_texts_per_call texts from the queue; expired requests are failed."""
        now = asyncio.get_running_loop().time()
        batch: list[_Waiting] = []
        count = 0
        while self._queue:
            head = self._queue[0]
            if batch and count + len(head.texts) > self._max_texts:
                break
            self._queue.popleft()
            self._queued_texts -= len(head.texts)
            if head.future.done():  # the caller gave up
                continue
            if head.deadline is not None and head.deadline <= now:
                head.future.set_exception(
                    DeadlineExceeded("the deadline passed while waiting for the embedding server")
                )
                continue
            batch.append(head)
            count += len(head.texts)
        return batch

    async def _send(self, batch: list[_Waiting]) -> None:
        try:
            now = asyncio.get_running_loop().time()
            ends = [w.deadline for w in batch]
            left = None if None in ends else max(e for e in ends if e is not None) - now
            texts = [text for waiting in batch for text in waiting.texts]
            self.calls_made += 1
            try:
                with deadlines.within(left):
                    vectors = await self._embed(texts)
            except Exception as exc:
                for waiting in batch:
                    if not waiting.future.done():
                        waiting.future.set_exception(exc)
                return
            offsets = np.cumsum([0, *(len(w.texts) for w in batch)])
            for waiting, start, end in zip(batch, offsets[:-1], offsets[1:], strict=True):
                if not waiting.future.done():
                    waiting.future.set_result(vectors[start:end])
        finally:
            self._slots.release()
