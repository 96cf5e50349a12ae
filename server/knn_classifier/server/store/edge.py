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

Faults. Any exception out of Edge, a Rust panic included (PyO3's ``PanicException`` derives
from BaseException, so ``except Exception`` misses it), means a shard's files or the engine's
state are damaged: it becomes :class:`Unavailable` naming the shard, and from then on the store
refuses every call (its health check fails) until the process restarts, instead of writing on
into a damaged shard. Edge writes through memory-mapped files, so a full disk would kill the
process with SIGBUS: a write is refused with :class:`ResourceExhausted` when the file system
would keep less than ``min_free_bytes`` free after it. Opening writes too (WAL replay, index
files), so the store opens only with half that reserve free: after writes stopped at the
reserve, a restart still opens and serves reads.
A shard that cannot be opened (damaged, locked by another process, not writable) is a
:class:`StartupError` naming it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from ..errors import Reason, ResourceExhausted, StartupError, Unavailable
from .base import Matrix, Payload, Record, Selection, Store, meta_point_id
from .mirror import Mirror
from .schema import CLASSIFIER, LABEL, ExemplarPayload, read_payload

log = logging.getLogger(__name__)

_FACET_LIMIT = 1_000_000
_MIB = 2**20
_REMEDY = (
    "restore the data directory from a backup, or move a damaged dimension shard (d<N>) aside "
    "and start again: start-up rebuilds it from the other dimensions"
)
# What an Edge call may raise that is not Edge's failure: these propagate unchanged.
_NOT_EDGE_FAILURES = (KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit)


class EdgeStore(Store):
    def __init__(self, data_dir: Path, min_free_bytes: int = 0) -> None:
        self._root = data_dir / "edge"
        self._min_free = min_free_bytes
        self._shards: dict[int, qe.EdgeShard] = {}
        self._meta: qe.EdgeShard | None = None
        self._mirrors: dict[tuple[int, str], Mirror] = {}
        self._meta_read: dict[str, Payload] = {}
        self._broken: str | None = None
        """Why the store is out of service (see the module docstring), or None."""
        self._low_on_space = False

    async def existing_dimensions(self) -> list[int]:
        if not self._root.is_dir():
            return []
        return sorted(
            int(path.name[1:])
            for path in self._root.iterdir()
            if path.name.startswith("d") and path.name[1:].isdigit()
        )

    async def open(self, dimensions: Sequence[int]) -> None:
        self._check_data_dir()
        try:
            self._meta = self._open_shard("meta", 1, indexed=False)
            for dimension in dimensions:
                self._shards[dimension] = self._open_shard(f"d{dimension}", dimension)
        except BaseException:
            await self.close()  # release the shards already open, and their locks
            raise

    async def close(self) -> None:
        shards = [(f"d{dimension}", shard) for dimension, shard in self._shards.items()]
        if self._meta is not None:
            shards.append(("meta", self._meta))
        for name, shard in shards:
            try:
                shard.flush()
                shard.close()
            except _NOT_EDGE_FAILURES:
                raise
            except BaseException as exc:  # a damaged shard: close the others all the same
                log.error("closing the embedded store shard %s failed: %r", self._root / name, exc)
        self._shards.clear()
        self._mirrors.clear()
        self._meta_read.clear()
        self._meta = None

    def _check_data_dir(self) -> None:
        """Fails start-up, naming the directory and what to do, where Edge could not work."""
        try:
            self._root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create the data directory {self._root} ({exc.strerror}); set "
                "KNN_DATA_DIR to a directory the service can write"
            ) from exc
        if not os.access(self._root, os.W_OK):
            raise StartupError(
                f"the data directory {self._root} is not writable (read-only file system or "
                "permissions); make it writable for the service's user, or set KNN_DATA_DIR to "
                "a writable directory"
            )
        free = _free_bytes(self._root)
        if free < self._min_free // 2:
            raise StartupError(
                f"the disk of the data directory {self._root} has {free / _MIB:.1f} MiB free, "
                f"less than the {self._min_free / 2 / _MIB:.1f} MiB the embedded store needs to "
                "open (half its reserve, KNN_STORE__MIN_FREE_BYTES); free disk space there, or "
                "move KNN_DATA_DIR to a larger disk"
            )

    def _open_shard(self, name: str, size: int, *, indexed: bool = True) -> qe.EdgeShard:
        path = self._root / name
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=size, distance=qe.Distance.Cosine))
        try:
            if (path / "wal").exists():
                return qe.EdgeShard.load(str(path), config)
            shard = qe.EdgeShard.create(str(path), config)
            if indexed:
                shard.update(
                    qe.UpdateOperation.create_field_index(
                        CLASSIFIER, qe.KeywordIndexParams(is_tenant=True)
                    )
                )
                shard.update(
                    qe.UpdateOperation.create_field_index(LABEL, qe.PayloadSchemaType.Keyword)
                )
        except _NOT_EDGE_FAILURES:
            raise
        except BaseException as exc:
            raise StartupError(_open_failure(path, exc)) from exc
        log.info("created embedded shard %s (size %d)", path, size)
        return shard

    @contextmanager
    def _using(self, dimension: int | None) -> Iterator[qe.EdgeShard]:
        """The shard of ``dimension`` (None: meta) for Edge calls; see the module docstring."""
        if self._broken is not None:
            raise Unavailable(self._broken)
        shard = self._meta if dimension is None else self._shards.get(dimension)
        name = "meta" if dimension is None else f"d{dimension}"
        if shard is None:
            raise RuntimeError(f"the embedded store has no open shard {name}")
        try:
            yield shard
        except _NOT_EDGE_FAILURES:
            raise
        except BaseException as exc:
            path = self._root / name
            log.error(
                "the embedded store shard %s failed: %r; the store refuses every call until the "
                "service restarts",
                path,
                exc,
            )
            self._broken = (
                f"the embedded store failed in {path} (details in the server log) and is out of "
                "service until the service restarts; if it fails again, that shard's files are "
                f"damaged: {_REMEDY}"
            )
            raise Unavailable(self._broken) from exc

    def _ensure_room(self, size: int | None) -> None:
        """Refuses a write that would eat into the free-space reserve: an addition of about
        ``size`` bytes, or a deletion (None). A deletion writes a WAL record and a flag per
        point and may use the reserve's first half, so that a refused write can be rolled back
        where other dimensions took it."""
        free = _free_bytes(self._root)
        if size is None:
            if free >= self._min_free // 2:
                return
        elif free - size >= self._min_free:
            if self._low_on_space:
                log.warning("the data directory's disk has room again; writes are accepted")
                self._low_on_space = False
            return
        if not self._low_on_space:
            log.warning(
                "the disk of %s has %.1f MiB free, within the reserve of %.1f MiB "
                "(KNN_STORE__MIN_FREE_BYTES): writes are refused until there is room; reads go on",
                self._root,
                free / _MIB,
                self._min_free / _MIB,
            )
            self._low_on_space = True
        raise ResourceExhausted(
            f"the data directory's disk is nearly full ({free / _MIB:.1f} MiB free; the store "
            f"keeps {self._min_free / _MIB:.1f} MiB in reserve), so this write was refused and "
            "nothing was written; free disk space on the server, then retry. Reads and deletes "
            "go on",
            reason=Reason.STORAGE_FULL,
            metadata={"freeBytes": free, "reserveBytes": self._min_free},
        )

    # Meta records ----------------------------------------------------------------------------

    async def get_meta(self, key: str) -> Payload | None:
        """The record as last read from the shard: every request reads its classifier's, and
        this process is the only writer, so a record read is kept until this process writes it
        (absent keys are not kept: any name may be asked for)."""
        with self._using(None) as shard:
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
        self._ensure_room(None)
        with self._using(None) as shard:
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
        self._ensure_room(None)
        with self._using(None) as shard:
            shard.update(qe.UpdateOperation.delete_points([meta_point_id(key)]))

    async def list_meta(self, kind: str) -> list[Payload]:
        kind_filter = qe.Filter(must=[qe.FieldCondition("kind", match=qe.MatchValue(kind))])
        with self._using(None) as shard:
            return [dict(record.payload or {}) for record in _scroll_all(shard, kind_filter)]

    # Exemplars -------------------------------------------------------------------------------

    async def upsert(
        self,
        dimension: int,
        ids: Sequence[str],
        vectors: Matrix,
        payloads: Sequence[ExemplarPayload],
    ) -> None:
        # The WAL and the segment each hold the vectors and the payloads.
        self._ensure_room(2 * (vectors.nbytes + len(json.dumps(list(payloads), default=str))))
        points = [
            qe.Point(point_id, vector, dict(payload))
            for point_id, vector, payload in zip(ids, vectors.tolist(), payloads, strict=True)
        ]
        with self._using(dimension) as shard:
            shard.update(qe.UpdateOperation.upsert_points(points))
        for classifier in {payload["classifier"] for payload in payloads}:
            mirror = self._mirrors.get((dimension, classifier))
            if mirror is not None:
                rows = [i for i, p in enumerate(payloads) if p["classifier"] == classifier]
                mirror.upsert([ids[i] for i in rows], vectors[rows], [payloads[i] for i in rows])

    async def delete(self, dimension: int, selection: Selection) -> None:
        self._ensure_room(None)
        with self._using(dimension) as shard:
            shard.update(qe.UpdateOperation.delete_points_by_filter(_filter(selection)))
        key = (dimension, selection.classifier)
        if selection.ids is None and selection.label is None:
            self._mirrors.pop(key, None)
        elif key in self._mirrors:
            self._mirrors[key].delete(selection)

    async def count(self, dimension: int, selection: Selection) -> int:
        with self._using(dimension) as shard:
            return _count(shard, _filter(selection))

    async def label_counts(self, dimension: int, classifier: str) -> dict[str, int]:
        request = qe.FacetRequest(
            LABEL, limit=_FACET_LIMIT, exact=True, filter=_filter(Selection(classifier))
        )
        with self._using(dimension) as shard:
            return {str(hit.value): hit.count for hit in shard.facet(request)}

    async def classifier_counts(self, dimension: int) -> dict[str, int]:
        request = qe.FacetRequest(CLASSIFIER, limit=_FACET_LIMIT, exact=True)
        with self._using(dimension) as shard:
            hits = shard.facet(request)
        # Unfiltered, Edge also lists values whose points were all deleted, with a count of 0.
        return {str(hit.value): hit.count for hit in hits if hit.count}

    async def scroll(
        self, dimension: int, selection: Selection, limit: int, offset: str | None
    ) -> tuple[list[Record], str | None]:
        request = qe.ScrollRequest(
            offset=offset, limit=limit, filter=_filter(selection), with_payload=True
        )
        with self._using(dimension) as shard:
            records, next_offset = shard.scroll(request)
            page = [Record(str(record.id), read_payload(record.payload)) for record in records]
        return page, None if next_offset is None else str(next_offset)

    async def point_ids(self, dimension: int, classifier: str) -> set[str]:
        with self._using(dimension) as shard:
            records = _scroll_all(shard, _filter(Selection(classifier)), payload=False)
            return {str(record.id) for record in records}

    async def retrieve(self, dimension: int, ids: Sequence[str]) -> tuple[list[Record], Matrix]:
        with self._using(dimension) as shard:
            return _with_vectors(shard.retrieve(list(ids), True, True), dimension)

    async def vectors(self, dimension: int, classifier: str) -> tuple[list[Record], Matrix]:
        """From the classifier's in-memory copy if a query loaded it (the label models are
        fitted after a query); else from the shard, in a worker thread: converting tens of
        thousands of records held the event loop for seconds (docs/reliability.md); the shard's
        calls hold the GIL, but one page at a time."""
        with self._using(dimension):
            mirror = self._mirrors.get((dimension, classifier))
        if mirror is not None:
            return mirror.snapshot()
        return await asyncio.to_thread(self._vectors, dimension, classifier)

    def _vectors(self, dimension: int, classifier: str) -> tuple[list[Record], Matrix]:
        where = _filter(Selection(classifier))
        with self._using(dimension) as shard:
            records: list[Record] = []
            # The count is a first guess only: this runs in a worker thread beside writes.
            matrix = np.empty((_count(shard, where), dimension), dtype=np.float32)
            for ids, vectors, payloads in _vector_pages(shard, where, dimension):
                start, end = len(records), len(records) + len(ids)
                if end > len(matrix):
                    matrix = np.concatenate([matrix[:start], vectors])
                else:
                    matrix[start:end] = vectors
                records.extend(map(Record, ids, payloads))
            return records, matrix[: len(records)]

    async def query(
        self, dimension: int, classifier: str, vectors: Matrix, k: int
    ) -> list[list[Record]]:
        return self._mirror(dimension, classifier).query(vectors, k)

    def _mirror(self, dimension: int, classifier: str) -> Mirror:
        key = (dimension, classifier)
        with self._using(dimension) as shard:
            if key not in self._mirrors:
                where = _filter(Selection(classifier))
                mirror = Mirror(dimension, capacity=_count(shard, where))
                for ids, vectors, payloads in _vector_pages(shard, where, dimension):
                    mirror.upsert(ids, vectors, payloads)
                self._mirrors[key] = mirror
        return self._mirrors[key]


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _open_failure(path: Path, exc: BaseException) -> str:
    """What to tell the operator when Edge cannot open the shard at ``path``."""
    detail = str(exc)
    if "WouldBlock" in detail:  # the WAL's directory lock is held
        return (
            f"the embedded store at {path} is locked by another process (another knn-classifier "
            "on the same data directory?); stop it, or give each instance its own KNN_DATA_DIR"
        )
    if "os error 30" in detail or "os error 13" in detail:  # EROFS, EACCES
        return (
            f"the embedded store at {path} is not writable ({detail}); make the data directory "
            "writable for the service's user, or set KNN_DATA_DIR to a writable directory"
        )
    return f"the embedded store at {path} cannot be opened ({detail}); it is damaged: {_REMEDY}"


def _with_vectors(records: Sequence[qe.Record], dimension: int) -> tuple[list[Record], Matrix]:
    matrix = np.asarray([r.vector for r in records], dtype=np.float32).reshape(-1, dimension)
    return [Record(str(r.id), read_payload(r.payload)) for r in records], matrix


def _filter(selection: Selection) -> qe.Filter:
    must: list[qe.ConditionType] = [
        qe.FieldCondition(CLASSIFIER, match=qe.MatchValue(selection.classifier))
    ]
    if selection.label is not None:
        must.append(qe.FieldCondition(LABEL, match=qe.MatchValue(selection.label)))
    if selection.ids is not None:
        must.append(qe.HasIdCondition(set(selection.ids)))
    return qe.Filter(must=must)


def _scroll_all(
    shard: qe.EdgeShard, where: qe.Filter, vectors: bool = False, payload: bool | list[str] = True
) -> list[qe.Record]:
    return [record for page in _pages(shard, where, vectors, payload) for record in page]


def _pages(
    shard: qe.EdgeShard, where: qe.Filter, vectors: bool = False, payload: bool | list[str] = True
) -> Iterator[list[qe.Record]]:
    offset: qe.PointId | None = None
    while True:
        request = qe.ScrollRequest(
            offset=offset, limit=1000, filter=where, with_payload=payload, with_vector=vectors
        )
        page, offset = shard.scroll(request)
        yield page
        if offset is None:
            return


def _vector_pages(
    shard: qe.EdgeShard, where: qe.Filter, dimension: int
) -> Iterator[tuple[list[str], Matrix, list[ExemplarPayload]]]:
    """The points ``where`` selects, a page at a time: Edge gives each vector as a list of
    Python floats (eight times the bytes of float32), so a caller that keeps each page as
    float32 before reading the next holds one page of them, not the classifier's."""
    for page in _pages(shard, where, vectors=True):
        vectors = np.asarray([r.vector for r in page], dtype=np.float32).reshape(-1, dimension)
        yield [str(r.id) for r in page], vectors, [read_payload(r.payload) for r in page]


def _count(shard: qe.EdgeShard, where: qe.Filter) -> int:
    return shard.count(qe.CountRequest(exact=True, filter=where))
