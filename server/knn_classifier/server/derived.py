"""Models derived from a classifier's exemplars, cached above the store by revision.

``await ExemplarModels.get(config, dimension, kind, fit)``: ``fit(labels, vectors)`` of the
classifier's exemplars in ``dimension`` at the revision of ``config``, fitted at most once per
revision (and once at a time) in a worker thread.

A derived model (a label model; later the open-set statistics) is a function of one
classifier's exemplars in one dimension. Every acknowledged write to a classifier moves the
revision in its record after its points are written (:mod:`classifiers`), so a model computed
from exemplars read after the record was read at revision R holds every write up to R. Models
are therefore kept under (classifier, incarnation, revision, dimension, kind): a caller that
read the record at another revision asks for another key and gets a new fit, on any replica,
with no signal between replicas beyond the record each call reads anyway (docs/design.md,
"Derived models and replicas").

Concurrent callers of one key share one computation (single flight). It runs in a task of its
own, so a caller that leaves (its deadline passed, it hung up) does not cancel it for the
others, and a finished one is kept for the next caller. A failed computation is not kept. At
most ``max_entries`` models are kept, the least recently used dropped first; storing a newer
revision drops the older ones of the same classifier, dimension and kind at once.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from .domain import ClassifierConfig
from .metrics import Metrics
from .store import Store
from .store.base import Matrix

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class DerivedKey:
    """What a derived model was computed from, and which model it is."""

    classifier: str
    uid: str
    """The classifier's incarnation: one deleted and created again starts at revision 1 again."""
    revision: int
    dimension: int
    kind: str
    """Which model, e.g. ``label-model:centroid``."""

    @classmethod
    def of(cls, config: ClassifierConfig, dimension: int, kind: str) -> DerivedKey:
        return cls(config.name, config.uid, config.revision, dimension, kind)

    def supersedes(self, other: DerivedKey) -> bool:
        """Whether this key is a later state of the same model than ``other``."""
        return (self.classifier, self.dimension, self.kind) == (
            other.classifier,
            other.dimension,
            other.kind,
        ) and (self.uid != other.uid or self.revision > other.revision)


class ExemplarModels:
    """Models fitted from a classifier's labels and vectors, through a :class:`DerivedCache`."""

    def __init__(self, store: Store, max_entries: int, metrics: Metrics | None = None) -> None:
        self._store = store
        self._cache = DerivedCache(max_entries, metrics)

    async def get(
        self,
        config: ClassifierConfig,
        dimension: int,
        kind: str,
        fit: Callable[[Sequence[str], Matrix], T],
    ) -> T:
        """``fit`` of the in-scope exemplars of ``config``'s classifier in ``dimension`` (their
        labels, and their vectors row by row) as of ``config``'s revision or later: negative
        exemplars are in no label statistic. ``kind`` names what ``fit`` computes: one kind,
        one ``fit``. Negatives are left out whatever ``config``'s mark says: a negative
        added after ``config`` was read is read here too."""

        async def compute() -> T:
            records, vectors = await self._store.vectors(dimension, config.name)
            rows = [i for i, r in enumerate(records) if not r.payload["out_of_scope"]]
            if len(rows) < len(records):
                records, vectors = [records[i] for i in rows], vectors[rows]
            labels = [record.payload["label"] for record in records]
            return await asyncio.to_thread(fit, labels, vectors)

        return await self._cache.get(DerivedKey.of(config, dimension, kind), compute)


class DerivedCache:
    def __init__(self, max_entries: int, metrics: Metrics | None = None) -> None:
        self._max = max_entries
        self._metrics = metrics or Metrics()
        self._entries: OrderedDict[DerivedKey, asyncio.Future[Any]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: DerivedKey, compute: Callable[[], Awaitable[T]]) -> T:
        """The model of ``key``: kept, being computed by another caller, or ``compute()``d now.

        ``compute`` must keep the event loop free (run CPU work with ``asyncio.to_thread``).
        The value of a key must be of one type; ``compute`` decides it.
        """
        entry = self._entries.get(key)
        if entry is None:
            entry = asyncio.ensure_future(self._timed(key.kind, compute))
            entry.add_done_callback(lambda done: self._forget_if_failed(key, done))
            self._add(key, entry)
        else:
            self._entries.move_to_end(key)
        return cast(T, await asyncio.shield(entry))

    async def _timed(self, kind: str, compute: Callable[[], Awaitable[T]]) -> T:
        started = time.perf_counter()
        value = await compute()
        self._metrics.model_fit_seconds.labels(kind).observe(time.perf_counter() - started)
        return value

    def _add(self, key: DerivedKey, entry: asyncio.Future[Any]) -> None:
        for old in [old for old in self._entries if key.supersedes(old)]:
            del self._entries[old]
        self._entries[key] = entry
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def _forget_if_failed(self, key: DerivedKey, entry: asyncio.Future[Any]) -> None:
        # Reading the exception also marks it retrieved when no caller is left to await it.
        failed = entry.cancelled() or entry.exception() is not None
        if failed and self._entries.get(key) is entry:
            del self._entries[key]
