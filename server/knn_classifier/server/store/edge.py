"""The embedded store: Qdrant Edge (Qdrant's engine as a library), one shard per dimension.

Layout under the data directory: ``edge/d<dimension>/`` per dimension and ``edge/meta/``
(opened, guarded and kept clear of a full disk by :class:`EdgeShards`).
Writes go through the shard's write-ahead log before ``update`` returns, so an acknowledged
write survives a crash of the process; the WAL also locks the directory against a second
process, so this process is the only writer. Queries are exact and are answered from an
in-memory copy of the queried classifier's vectors (:class:`Mirror`), loaded from the shard on
the first query and updated by every write after the shard has taken it: a matrix product is
several times faster than Edge's filtered exact search with payloads (docs/benchmarks.md).
Filtered HNSW search lost recall in our tests, so it is not used. Calls are synchronous and
short; they run on the event loop thread, except the whole-classifier reads: loading a copy,
freezing one for ``vectors`` and building its records run in a worker thread, while writes to
that classifier wait (:class:`SingleFlight`; docs/reliability.md); and so do large queries of a
copy (:class:`QueryHold`) and the building of an upsert's points.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from pathlib import Path

import qdrant_edge as qe

from .base import Matrix, Payload, Record, Selection, SnapshotRecord, Store, meta_point_id
from .edge_reads import (
    WITHOUT_METADATA,
    count_points,
    scroll_all,
    selection_filter,
    stack_pages,
    vector_pages,
    with_vectors,
)
from .edge_shards import EdgeShards
from .mirror import FrozenMirror, Mirror, query_work, room_for
from .query_hold import QueryHold
from .schema import CLASSIFIER, LABEL, ExemplarPayload, read_payload, stored_payload
from .single_flight import SingleFlight

_FACET_LIMIT = 1_000_000

QUERY_OFF_LOOP_WORK = 150_000_000
"""A copy's query estimated at this much work (:func:`query_work`) or more runs in a worker
thread; below it, on the event loop (the threshold's measurement: docs/reliability.md)."""


def _points(
    ids: Sequence[str], vectors: Matrix, payloads: Sequence[ExemplarPayload]
) -> tuple[list[qe.Point], int]:
    """Edge's points for an upsert, and the bytes the write takes on disk: the WAL and the
    segment each hold the vectors and the payloads."""
    size = 2 * (vectors.nbytes + len(json.dumps(list(payloads), default=str)))
    points = [
        qe.Point(point_id, vector, stored_payload(payload))
        for point_id, vector, payload in zip(ids, vectors.tolist(), payloads, strict=True)
    ]
    return points, size


class EdgeStore(Store):
    shared = False  # its directory lock keeps every other process out

    def __init__(self, data_dir: Path, min_free_bytes: int = 0) -> None:
        self._shards = EdgeShards(data_dir / "edge", min_free_bytes)
        self._mirrors: dict[tuple[int, str], Mirror] = {}
        self._copy_reads = SingleFlight()
        """Loads and freezes of copies, keyed ("load" or "freeze", dimension, classifier)."""
        self._queries = QueryHold()
        """Large queries of copies, keyed (dimension, classifier)."""
        self._meta_read: dict[str, Payload] = {}

    async def existing_dimensions(self) -> list[int]:
        root = self._shards.root
        if not root.is_dir():
            return []
        return sorted(
            int(path.name[1:])
            for path in root.iterdir()
            if path.name.startswith("d") and path.name[1:].isdigit()
        )

    async def open(self, dimensions: Sequence[int]) -> None:
        self._shards.open(dimensions)

    async def close(self) -> None:
        self._shards.close()
        # New ones, not cleared: a load still running keeps its copy in the old ones, not in
        # this store opened again (its copy would miss what was written in between).
        self._mirrors = {}
        self._copy_reads = SingleFlight()
        self._queries = QueryHold()
        self._meta_read.clear()

    # Meta records ----------------------------------------------------------------------------

    async def get_meta(self, key: str) -> Payload | None:
        """The record as last read from the shard: every request reads its classifier's, and
        this process is the only writer, so a record read is kept until this process writes it
        (absent keys are not kept: any name may be asked for)."""
        with self._shards.using(None) as shard:
            if key not in self._meta_read:
                records = shard.retrieve([meta_point_id(key)], True, False)
                if not records:
                    return None
                self._meta_read[key] = dict(records[0].payload or {})
        return dict(self._meta_read[key])

    async def put_meta(self, key: str, payload: Payload) -> None:
        self._meta_read.pop(key, None)
        record = {**payload, "key": key}
        # Records are small and replace their previous version; deletes write them too (the
        # "deleting" mark, the revision), so they may use the deletions' half of the reserve.
        self._shards.ensure_room(None)
        with self._shards.using(None) as shard:
            point = qe.Point(meta_point_id(key), [1.0], record)
            shard.update(qe.UpdateOperation.upsert_points([point]))

    async def update_meta(self, key: str, fields: Payload, where: Payload) -> None:
        # This process is the store's only writer and nothing below awaits: read, compare and
        # write are one step.
        current = await self.get_meta(key)
        if current is not None and all(current.get(k) == v for k, v in where.items()):
            await self.put_meta(key, {k: v for k, v in {**current, **fields}.items() if k != "key"})

    async def delete_meta(self, key: str) -> None:
        self._meta_read.pop(key, None)
        self._shards.ensure_room(None)
        with self._shards.using(None) as shard:
            shard.update(qe.UpdateOperation.delete_points([meta_point_id(key)]))

    async def list_meta(self, kind: str) -> list[Payload]:
        kind_filter = qe.Filter(must=[qe.FieldCondition("kind", match=qe.MatchValue(kind))])
        with self._shards.using(None) as shard:
            return [dict(record.payload or {}) for record in scroll_all(shard, kind_filter)]

    # Exemplars -------------------------------------------------------------------------------

    async def upsert(
        self,
        dimension: int,
        ids: Sequence[str],
        vectors: Matrix,
        payloads: Sequence[ExemplarPayload],
    ) -> None:
        """Edge's points are built in a worker thread (the loop gets the GIL between points),
        while large queries of the copies asked for meanwhile wait, as they wait for a write
        waiting for the copies to settle; Edge's write, which holds the GIL throughout, and the
        copies' update run on the loop in one step, so no load, freeze or large query of a copy
        starts between them."""
        classifiers = {payload["classifier"] for payload in payloads}
        with self._queries.writing([(dimension, classifier) for classifier in classifiers]):
            points, size = await asyncio.to_thread(_points, ids, vectors, payloads)
            await self._copies_settled(dimension, classifiers)
        self._shards.ensure_room(size)
        with self._shards.using(dimension) as shard:
            shard.update(qe.UpdateOperation.upsert_points(points))
        for classifier in classifiers:
            mirror = self._mirrors.get((dimension, classifier))
            if mirror is not None:
                rows = [i for i, p in enumerate(payloads) if p["classifier"] == classifier]
                mirror.upsert([ids[i] for i in rows], vectors[rows], [payloads[i] for i in rows])

    async def delete(self, dimension: int, selection: Selection) -> None:
        await self._copies_settled(dimension, {selection.classifier})
        self._shards.ensure_room(None)
        with self._shards.using(dimension) as shard:
            shard.update(qe.UpdateOperation.delete_points_by_filter(selection_filter(selection)))
        key = (dimension, selection.classifier)
        if selection == Selection(selection.classifier):  # the whole classifier
            self._mirrors.pop(key, None)
        elif key in self._mirrors:
            self._mirrors[key].delete(selection)

    async def count(self, dimension: int, selection: Selection) -> int:
        with self._shards.using(dimension) as shard:
            return count_points(shard, selection_filter(selection))

    async def label_counts(
        self, dimension: int, classifier: str, out_of_scope: bool | None = None
    ) -> dict[str, int]:
        where = selection_filter(Selection(classifier, out_of_scope=out_of_scope))
        request = qe.FacetRequest(LABEL, limit=_FACET_LIMIT, exact=True, filter=where)
        with self._shards.using(dimension) as shard:
            return {str(hit.value): hit.count for hit in shard.facet(request)}

    async def classifier_counts(self, dimension: int) -> dict[str, int]:
        request = qe.FacetRequest(CLASSIFIER, limit=_FACET_LIMIT, exact=True)
        with self._shards.using(dimension) as shard:
            hits = shard.facet(request)
        # Unfiltered, Edge also lists values whose points were all deleted, with a count of 0.
        return {str(hit.value): hit.count for hit in hits if hit.count}

    async def scroll(
        self, dimension: int, selection: Selection, limit: int, offset: str | None
    ) -> tuple[list[Record], str | None]:
        request = qe.ScrollRequest(
            offset=offset, limit=limit, filter=selection_filter(selection), with_payload=True
        )
        with self._shards.using(dimension) as shard:
            records, next_offset = shard.scroll(request)
            page = [Record(str(record.id), read_payload(record.payload)) for record in records]
        return page, None if next_offset is None else str(next_offset)

    async def point_ids(self, dimension: int, classifier: str) -> set[str]:
        with self._shards.using(dimension) as shard:
            records = scroll_all(shard, selection_filter(Selection(classifier)), payload=False)
            return {str(record.id) for record in records}

    async def retrieve(self, dimension: int, ids: Sequence[str]) -> tuple[list[Record], Matrix]:
        with self._shards.using(dimension) as shard:
            return with_vectors(shard.retrieve(list(ids), True, True), dimension)

    async def vectors(self, dimension: int, classifier: str) -> tuple[list[SnapshotRecord], Matrix]:
        """From the classifier's in-memory copy if a query loaded it (the label models are
        fitted after a query); else from the shard. Either way the records are built in a
        worker thread: converting tens of thousands of records held the event loop for seconds
        (docs/reliability.md); the shard's calls hold the GIL, but one page at a time. The
        copy is frozen first, in a worker thread too (copying its matrix held the loop), with
        writes to it held off until it is."""
        with self._shards.using(dimension):
            mirror = self._mirrors.get((dimension, classifier))
        if mirror is not None:
            frozen: FrozenMirror = await self._copy_reads.run(
                ("freeze", dimension, classifier), mirror.frozen
            )
            return await asyncio.to_thread(frozen.snapshot)
        return await asyncio.to_thread(self._vectors, dimension, classifier)

    def _vectors(self, dimension: int, classifier: str) -> tuple[list[SnapshotRecord], Matrix]:
        where = selection_filter(Selection(classifier))
        with self._shards.using(dimension) as shard:
            # The count is a first guess only: this runs in a worker thread beside writes.
            pages = vector_pages(shard, where, dimension, WITHOUT_METADATA)
            return stack_pages(pages, count_points(shard, where), dimension)

    async def query(
        self,
        dimension: int,
        classifier: str,
        vectors: Matrix,
        k: int,
        out_of_scope: bool | None = None,
    ) -> list[list[Record]]:
        """Large queries (:data:`QUERY_OFF_LOOP_WORK`) run in a worker thread, while writes
        to the classifier wait (:class:`QueryHold`); the others on the event loop, in one step."""
        mirror = await self._mirror(dimension, classifier)
        if query_work(len(vectors), len(mirror), dimension, k) < QUERY_OFF_LOOP_WORK:
            return mirror.query(vectors, k, out_of_scope)
        search = functools.partial(mirror.query, vectors, k, out_of_scope)
        return await self._queries.run((dimension, classifier), search)

    async def _mirror(self, dimension: int, classifier: str) -> Mirror:
        """The classifier's copy, loaded on first use in a worker thread (page by page from the
        shard, which held the loop for seconds on large classifiers); queries meanwhile share
        the load, and writes to the classifier wait for it, so that it misses none."""
        key = (dimension, classifier)
        with self._shards.using(dimension):
            mirror = self._mirrors.get(key)
        if mirror is not None:
            return mirror
        keep = functools.partial(self._mirrors.__setitem__, key)
        load = functools.partial(self._load, dimension, classifier)
        return await self._copy_reads.run(("load", *key), load, keep)

    def _load(self, dimension: int, classifier: str) -> Mirror:
        where = selection_filter(Selection(classifier))
        with self._shards.using(dimension) as shard:
            mirror = Mirror(dimension, capacity=room_for(count_points(shard, where)))
            for ids, vectors, stored in vector_pages(shard, where, dimension):
                mirror.upsert(ids, vectors, [read_payload(payload) for payload in stored])
        return mirror

    async def _copies_settled(self, dimension: int, classifiers: set[str]) -> None:
        """Waits until no copy of ``classifiers`` is being loaded, frozen or queried in a worker
        thread (:class:`SingleFlight`, :class:`QueryHold`); queries of them asked for meanwhile
        wait, and the write that awaits this writes before any of these can start."""
        reads = [(kind, dimension, c) for kind in ("load", "freeze") for c in classifiers]
        copies = [(dimension, classifier) for classifier in classifiers]
        with self._queries.writing(copies):
            while running := [*self._copy_reads.running(reads), *self._queries.running(copies)]:
                await asyncio.wait(running)
