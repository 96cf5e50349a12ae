"""Coalescing: concurrent Classify calls share embedding calls and store queries.

Embedding (:class:`Coalescer`): each waiting request joins a queue. One worker turns the queue
into calls of up to ``max_texts_per_call`` texts, at most ``max_concurrent_calls`` in flight. An
idle service sends a request at once, so it adds no latency. A busy one (a call is in flight, or
the last call carried several requests) starts calls at most every ``max_wait_s`` unless the
next call is full, so requests arriving meanwhile ride together even when the embedder answers
fast (each call has a fixed CPU cost in the client, whatever its size). The queue is bounded: a
request that does not fit is refused at once with RESOURCE_EXHAUSTED, and a request whose
deadline passed while it waited is never sent. When the model rejects a shared call, each of its
requests is sent again alone, so one caller's bad text fails only that caller; when the server
answers an unusable vector (all-zero, non-finite) for some texts, only the requests holding them
fail.

Store queries (:class:`QueryBatcher`): the requests of one embedding call resume together, and
their queries of the same classifier and dimension become one batched store query, which costs
far less than one query each.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import deadlines, tracing
from .errors import DeadlineExceeded, InvalidArgument, Reason, ResourceExhausted
from .metrics import Metrics
from .store import Record, Store
from .vectors import Embeds, Matrix, UnusableVectors, usable_rows

log = logging.getLogger(__name__)


@dataclass(eq=False)
class _Waiting:
    texts: Sequence[str]
    future: asyncio.Future[Matrix]
    deadline: float | None
    """The caller's deadline on the event loop's clock (None: none)."""


def _fail_if_late(waiting: _Waiting, now: float) -> bool:
    """Fails the request if its deadline has passed; whether it did."""
    if waiting.deadline is None or waiting.deadline > now:
        return False
    waiting.future.set_exception(
        DeadlineExceeded("the deadline passed while waiting for the embedding server")
    )
    return True


class Coalescer:
    """An embedding layer that sends the texts of concurrent requests to ``inner`` together."""

    def __init__(
        self,
        inner: Embeds,
        max_texts_per_call: int,
        max_concurrent_calls: int,
        max_queued_texts: int,
        max_wait_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._inner = inner
        self._max_texts = max_texts_per_call
        self._max_queued = max_queued_texts
        self._max_wait_s = max_wait_s
        self._slots = asyncio.Semaphore(max_concurrent_calls)
        self._queue: deque[_Waiting] = deque()
        self._queued_texts = 0
        self._in_flight = 0
        self._last_start = 0.0
        self._last_requests = 0
        self._arrived = asyncio.Event()
        self._worker: asyncio.Task[None] | None = None
        self._calls: set[asyncio.Task[None]] = set()
        self._metrics = metrics or Metrics()
        self._metrics.embedding_queued_texts.set_function(lambda: self._queued_texts)

    @property
    def queued_texts(self) -> int:
        """Texts waiting for an embedding call to start."""
        return self._queued_texts

    async def embed(self, texts: Sequence[str]) -> Matrix:
        """The full-width vectors of ``texts``, embedded together with other waiting requests."""
        if self._queued_texts + len(texts) > self._max_queued:
            raise ResourceExhausted(
                f"the embedding queue is full ({self._queued_texts} texts waiting, limit "
                f"{self._max_queued}); retry with backoff",
                reason=Reason.EMBEDDING_QUEUE_FULL,
                retry_after_s=0.2,
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
            # A fresh context: the worker serves every caller, so it must not carry the first
            # one's request id (logs) or span (traces).
            self._worker = asyncio.create_task(self._work(), context=contextvars.Context())
        return await waiting.future

    async def close(self) -> None:
        tasks = [t for t in (self._worker, *self._calls) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _work(self) -> None:
        while True:
            while not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            await self._pace()
            await self._slots.acquire()
            batch = self._take()
            if not batch:
                self._slots.release()
                continue
            self._in_flight += 1
            self._last_start = asyncio.get_running_loop().time()
            self._last_requests = len(batch)
            self._metrics.embedding_requests_per_call.observe(len(batch))
            task = asyncio.create_task(self._send(batch))
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)

    async def _pace(self) -> None:
        """When busy, waits until max_wait_s after the last call started or the next is full."""
        if not (self._in_flight or self._last_requests > 1):
            return
        loop = asyncio.get_running_loop()
        until = self._last_start + self._max_wait_s
        while self._queued_texts < self._max_texts:
            left = until - loop.time()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

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
            if head.future.done() or _fail_if_late(head, now):  # done: the caller gave up
                continue
            batch.append(head)
            count += len(head.texts)
        return batch

    async def _send(self, batch: list[_Waiting]) -> None:
        """Sends one call for ``batch`` in the slot the worker took, and answers its requests.

        SGLang rejects a whole call for one bad text, and its reason describes that text. So
        when the model rejects a call shared by several requests, each is sent again on its own
        (:meth:`_resend`) and gets its own answer: its vectors, or its own rejection. A request
        alone in its call gets the rejection at once, so nothing is ever sent more than twice.
        """
        try:
            outcome = await self._outcome(batch)
        finally:
            self._in_flight -= 1
            self._slots.release()
        if isinstance(outcome, InvalidArgument) and len(batch) > 1:
            await asyncio.gather(*(self._resend(waiting) for waiting in batch))
        else:
            self._answer(batch, outcome)

    async def _resend(self, waiting: _Waiting) -> None:
        """Sends one request on its own, in a slot of its own, unless its caller gave up."""
        async with self._slots:
            if waiting.future.done() or _fail_if_late(waiting, asyncio.get_running_loop().time()):
                return
            self._in_flight += 1
            try:
                outcome = await self._outcome([waiting])
            finally:
                self._in_flight -= 1
        self._answer([waiting], outcome)

    async def _outcome(self, batch: list[_Waiting]) -> Matrix | Exception:
        """The vectors of the batch's texts, in order, or the error the call failed with.

        The call may last until the latest deadline of the batch (none if one has none).
        """
        now = asyncio.get_running_loop().time()
        ends = [w.deadline for w in batch]
        left = None if None in ends else max(e for e in ends if e is not None) - now
        texts = [text for waiting in batch for text in waiting.texts]
        unique = list(dict.fromkeys(texts))  # concurrent requests often repeat a text
        try:
            with deadlines.within(left):
                vectors = await self._inner.embed(unique)
        except UnusableVectors as exc:
            vectors = exc.vectors  # _answer fails the requests holding an unusable row
        except Exception as exc:
            return exc
        if len(unique) < len(texts):
            row = {text: i for i, text in enumerate(unique)}
            vectors = vectors[[row[text] for text in texts]]
        return vectors

    @staticmethod
    def _answer(batch: list[_Waiting], outcome: Matrix | Exception) -> None:
        """Gives each request still waiting its rows of ``outcome``, or the error; a request
        with an unusable row gets UnusableVectors, whatever the rows of the others."""
        if isinstance(outcome, Exception):
            for waiting in batch:
                if not waiting.future.done():
                    waiting.future.set_exception(outcome)
            return
        usable = usable_rows(outcome)
        offsets = np.cumsum([0, *(len(w.texts) for w in batch)])
        for waiting, start, end in zip(batch, offsets[:-1], offsets[1:], strict=True):
            if waiting.future.done():
                continue
            if usable[start:end].all():
                waiting.future.set_result(outcome[start:end])
            else:
                waiting.future.set_exception(UnusableVectors(outcome[start:end]))


@dataclass(eq=False)
class _Query:
    vectors: Matrix
    k: int
    future: asyncio.Future[list[list[Record]]]


class QueryBatcher:
    """Queries of one classifier and dimension made in the same event-loop turn run as one.

    The batch asks for the largest k among them; each caller gets its own rows, cut to its k.
    """

    def __init__(self, store: Store, metrics: Metrics | None = None) -> None:
        self._store = store
        self._metrics = metrics or Metrics()
        self._pending: dict[tuple[int, str, bool | None], list[_Query]] = {}
        self._running: set[asyncio.Task[None]] = set()

    @tracing.traced("store.query")
    async def query(
        self,
        dimension: int,
        classifier: str,
        vectors: Matrix,
        k: int,
        out_of_scope: bool | None = None,
    ) -> list[list[Record]]:
        """For each row of ``vectors``, the ``k`` most similar points (see Store.query)."""
        tracing.annotate(dimension=dimension, k=k, queries=len(vectors))
        key = (dimension, classifier, out_of_scope)
        query = _Query(vectors, k, asyncio.get_running_loop().create_future())
        if key not in self._pending:
            self._pending[key] = []
            # The task starts after the callbacks already scheduled: the other requests
            # resumed by the same embedding call join the batch first.
            task = asyncio.create_task(self._run(key))
            self._running.add(task)
            task.add_done_callback(self._running.discard)
        self._pending[key].append(query)
        return await query.future

    async def _run(self, key: tuple[int, str, bool | None]) -> None:
        batch = self._pending.pop(key)
        dimension, classifier, out_of_scope = key
        vectors = batch[0].vectors if len(batch) == 1 else np.vstack([q.vectors for q in batch])
        try:
            metrics = self._metrics
            with metrics.series(metrics.store_query_seconds, str(dimension)).time():
                rows = await self._store.query(
                    dimension, classifier, vectors, max(q.k for q in batch), out_of_scope
                )
        except (asyncio.CancelledError, KeyboardInterrupt, SystemExit):
            for query in batch:
                query.future.cancel()
            raise
        except BaseException as exc:
            # Every caller is answered, whatever the store raised: a Rust panic from an
            # embedded engine derives from BaseException, and an unanswered caller waits forever.
            failure = exc
            if not isinstance(exc, Exception):
                log.error("store query of %r in dimension %d raised %r", classifier, dimension, exc)
                failure = RuntimeError(f"the store query raised {exc!r}")
            for query in batch:
                if not query.future.done():
                    query.future.set_exception(failure)
            return
        start = 0
        for query in batch:
            end = start + len(query.vectors)
            if not query.future.done():
                query.future.set_result([hits[: query.k] for hits in rows[start:end]])
            start = end
