"""The embedded store: Qdrant Edge (Qdrant's engine as a library), one shard per dimension.

Layout under the data directory: ``edge/d<dimension>/`` per dimension and ``edge/meta/``.
Writes go through the shard's write-ahead log before ``update`` returns, so an acknowledged
write survives a crash of the process; the WAL also locks the directory against a second
process, so this process is the only writer. Queries are exact and are answered from an
in-memory copy of the queried classifier's vectors (:class:`Mirror`), loaded from the shard on
the first query and updated by every write after the shard has taken it: a matrix product is
several times faster than Edge's filtered exact search with payloads (docs/benchmarks.md).
Filtered HNSW search lost recall in our tests, so it is not used. Calls are synchronous and
short; they run on the event loop thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from ..label_models import LabelModel
from .base import LabelModelFit, Matrix, Payload, Record, Selection, Store, meta_point_id
from .mirror import VOTE_FIELDS, Mirror

log = logging.getLogger(__name__)

_FACET_LIMIT = 1_000_000


class EdgeStore(Store):
    def __init__(self, data_dir: Path) -> None:
        self._root = data_dir / "edge"
        self._shards: dict[int, qe.EdgeShard] = {}
        self._meta: qe.EdgeShard | None = None
        self._mirrors: dict[tuple[int, str], Mirror] = {}
        self._meta_read: dict[str, Payload] = {}

    async def existing_dimensions(self) -> list[int]:
        if not self._root.is_dir():
            return []
        return sorted(
            int(path.name[1:])
            for path in self._root.iterdir()
            if path.name.startswith("d") and path.name[1:].isdigit()
        )

    async def open(self, dimensions: Sequence[int]) -> None:
        self._meta = _open_shard(self._root / "meta", 1, indexed=False)
        for dimension in dimensions:
            self._shards[dimension] = _open_shard(self._root / f"d{dimension}", dimension)

    async def close(self) -> None:
        for shard in [*self._shards.values(), *([self._meta] if self._meta else [])]:
            shard.flush()
            shard.close()
        self._shards.clear()
        self._mirrors.clear()
        self._meta_read.clear()
        self._meta = None

    # Meta records ----------------------------------------------------------------------------

    def _meta_shard(self) -> qe.EdgeShard:
        if self._meta is None:
            raise RuntimeError("the store is not open")
        return self._meta

    async def get_meta(self, key: str) -> Payload | None:
        """The record as last read from the shard: every request reads its classifier's, and
        this process is the only writer, so a record read is kept until this process writes it
        (absent keys are not kept: any name may be asked for)."""
        if key not in self._meta_read:
            records = self._meta_shard().retrieve([meta_point_id(key)], True, False)
            if not records:
                return None
            self._meta_read[key] = dict(records[0].payload or {})
        return dict(self._meta_read[key])

    async def put_meta(self, key: str, payload: Payload) -> None:
        self._meta_read.pop(key, None)
        point = qe.Point(meta_point_id(key), [1.0], {**payload, "key": key})
        self._meta_shard().update(qe.UpdateOperation.upsert_points([point]))

    async def delete_meta(self, key: str) -> None:
        self._meta_read.pop(key, None)
        self._meta_shard().update(qe.UpdateOperation.delete_points([meta_point_id(key)]))

    async def list_meta(self, kind: str) -> list[Payload]:
        kind_filter = qe.Filter(must=[qe.FieldCondition("kind", match=qe.MatchValue(kind))])
        return [
            dict(record.payload or {}) for record in _scroll_all(self._meta_shard(), kind_filter)
        ]

    # Exemplars -------------------------------------------------------------------------------

    def _shard(self, dimension: int) -> qe.EdgeShard:
        return self._shards[dimension]

    async def upsert(
        self, dimension: int, ids: Sequence[str], vectors: Matrix, payloads: Sequence[Payload]
    ) -> None:
        points = [
            qe.Point(point_id, vector, payload)
            for point_id, vector, payload in zip(ids, vectors.tolist(), payloads, strict=True)
        ]
        self._shard(dimension).update(qe.UpdateOperation.upsert_points(points))
        for classifier in {str(payload["classifier"]) for payload in payloads}:
            mirror = self._mirrors.get((dimension, classifier))
            if mirror is not None:
                rows = [i for i, p in enumerate(payloads) if p["classifier"] == classifier]
                mirror.upsert([ids[i] for i in rows], vectors[rows], [payloads[i] for i in rows])

    async def delete(self, dimension: int, selection: Selection) -> None:
        operation = qe.UpdateOperation.delete_points_by_filter(_filter(selection))
        self._shard(dimension).update(operation)
        key = (dimension, selection.classifier)
        if selection.ids is None and selection.label is None:
            self._mirrors.pop(key, None)
        elif key in self._mirrors:
            self._mirrors[key].delete(selection)

    async def count(self, dimension: int, selection: Selection) -> int:
        return self._shard(dimension).count(qe.CountRequest(exact=True, filter=_filter(selection)))

    async def label_counts(self, dimension: int, classifier: str) -> dict[str, int]:
        request = qe.FacetRequest(
            "label", limit=_FACET_LIMIT, exact=True, filter=_filter(Selection(classifier))
        )
        return {str(hit.value): hit.count for hit in self._shard(dimension).facet(request)}

    async def scroll(
        self, dimension: int, selection: Selection, limit: int, offset: str | None
    ) -> tuple[list[Record], str | None]:
        request = qe.ScrollRequest(
            offset=offset, limit=limit, filter=_filter(selection), with_payload=True
        )
        records, next_offset = self._shard(dimension).scroll(request)
        page = [Record(str(record.id), dict(record.payload or {})) for record in records]
        return page, None if next_offset is None else str(next_offset)

    async def point_ids(self, dimension: int, classifier: str) -> set[str]:
        records = _scroll_all(self._shard(dimension), _filter(Selection(classifier)), payload=False)
        return {str(record.id) for record in records}

    async def retrieve(self, dimension: int, ids: Sequence[str]) -> tuple[list[Record], Matrix]:
        records = self._shard(dimension).retrieve(list(ids), True, True)
        matrix = np.asarray([r.vector for r in records], dtype=np.float32).reshape(-1, dimension)
        return [Record(str(r.id), dict(r.payload or {})) for r in records], matrix

    async def vectors(self, dimension: int, classifier: str) -> tuple[list[Record], Matrix]:
        # In a worker thread: converting tens of thousands of records held the event loop for
        # seconds (docs/reliability.md); the shard's calls hold the GIL, but one page at a time.
        return await asyncio.to_thread(self._vectors, dimension, classifier)

    def _vectors(self, dimension: int, classifier: str) -> tuple[list[Record], Matrix]:
        records = _scroll_all(self._shard(dimension), _filter(Selection(classifier)), vectors=True)
        matrix = np.asarray([r.vector for r in records], dtype=np.float32).reshape(-1, dimension)
        return [Record(str(r.id), dict(r.payload or {})) for r in records], matrix

    async def query(
        self, dimension: int, classifier: str, vectors: Matrix, k: int
    ) -> list[list[Record]]:
        return self._mirror(dimension, classifier).query(vectors, k)

    async def label_model(self, dimension: int, classifier: str, fit: LabelModelFit) -> LabelModel:
        return await self._mirror(dimension, classifier).label_model(fit)

    def _mirror(self, dimension: int, classifier: str) -> Mirror:
        key = (dimension, classifier)
        if key not in self._mirrors:
            records = _scroll_all(
                self._shard(dimension),
                _filter(Selection(classifier)),
                vectors=True,
                payload=list(VOTE_FIELDS),
            )
            mirror = Mirror(dimension)
            if records:
                matrix = np.asarray([r.vector for r in records], dtype=np.float32)
                mirror.upsert(
                    [str(r.id) for r in records], matrix, [dict(r.payload or {}) for r in records]
                )
            self._mirrors[key] = mirror
        return self._mirrors[key]


def _open_shard(path: Path, size: int, *, indexed: bool = True) -> qe.EdgeShard:
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=size, distance=qe.Distance.Cosine))
    if (path / "wal").exists():
        return qe.EdgeShard.load(str(path), config)
    shard = qe.EdgeShard.create(str(path), config)
    if indexed:
        shard.update(
            qe.UpdateOperation.create_field_index(
                "classifier", qe.KeywordIndexParams(is_tenant=True)
            )
        )
        shard.update(qe.UpdateOperation.create_field_index("label", qe.PayloadSchemaType.Keyword))
    log.info("created embedded shard %s (size %d)", path, size)
    return shard


def _filter(selection: Selection) -> qe.Filter:
    must: list[qe.ConditionType] = [
        qe.FieldCondition("classifier", match=qe.MatchValue(selection.classifier))
    ]
    if selection.label is not None:
        must.append(qe.FieldCondition("label", match=qe.MatchValue(selection.label)))
    if selection.ids is not None:
        must.append(qe.HasIdCondition(set(selection.ids)))
    return qe.Filter(must=must)


def _scroll_all(
    shard: qe.EdgeShard, where: qe.Filter, vectors: bool = False, payload: bool | list[str] = True
) -> list[qe.Record]:
    records: list[qe.Record] = []
    offset: qe.PointId | None = None
    while True:
        request = qe.ScrollRequest(
            offset=offset, limit=1000, filter=where, with_payload=payload, with_vector=vectors
        )
        page, offset = shard.scroll(request)
        records.extend(page)
        if offset is None:
            return records
