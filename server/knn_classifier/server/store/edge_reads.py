"""Reading from an Edge shard: the filter of a selection, paged scrolls, and vectors as float32."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import qdrant_edge as qe

from .base import Matrix, Payload, Record, Selection, SnapshotRecord
from .schema import CLASSIFIER, LABEL, METADATA, OUT_OF_SCOPE, read_fields, read_payload

WITHOUT_METADATA = qe.PayloadSelector.Exclude([METADATA])
"""The payload selector of a snapshot's read (``Store.vectors``)."""


def with_vectors(records: Sequence[qe.Record], dimension: int) -> tuple[list[Record], Matrix]:
    matrix = np.asarray([r.vector for r in records], dtype=np.float32).reshape(-1, dimension)
    return [Record(str(r.id), read_payload(r.payload)) for r in records], matrix


def selection_filter(selection: Selection) -> qe.Filter:
    must: list[qe.ConditionType] = [
        qe.FieldCondition(CLASSIFIER, match=qe.MatchValue(selection.classifier))
    ]
    if selection.label is not None:
        must.append(qe.FieldCondition(LABEL, match=qe.MatchValue(selection.label)))
    if selection.ids is not None:
        must.append(qe.HasIdCondition(set(selection.ids)))
    in_scope = qe.IsEmptyCondition(OUT_OF_SCOPE)  # see schema.OUT_OF_SCOPE
    if selection.out_of_scope is False:
        must.append(in_scope)
    if selection.out_of_scope is True:
        return qe.Filter(must=must, must_not=[in_scope])
    return qe.Filter(must=must)


def scroll_all(
    shard: qe.EdgeShard, where: qe.Filter, vectors: bool = False, payload: bool | list[str] = True
) -> list[qe.Record]:
    return [record for page in pages(shard, where, vectors, payload) for record in page]


def pages(
    shard: qe.EdgeShard,
    where: qe.Filter,
    vectors: bool = False,
    payload: bool | list[str] | qe.PayloadSelector = True,
    limit: int = 1000,
) -> Iterator[list[qe.Record]]:
    offset: qe.PointId | None = None
    while True:
        request = qe.ScrollRequest(
            offset=offset, limit=limit, filter=where, with_payload=payload, with_vector=vectors
        )
        page, offset = shard.scroll(request)
        yield page
        if offset is None:
            return


def vector_pages(
    shard: qe.EdgeShard,
    where: qe.Filter,
    dimension: int,
    payload: bool | qe.PayloadSelector = True,
) -> Iterator[tuple[list[str], Matrix, list[Payload | None]]]:
    """The points ``where`` selects, a page at a time, their payloads as Edge gives them: Edge
    gives each vector as a list of Python floats (eight times the bytes of float32), so a
    caller that keeps each page as float32 before reading the next holds one page of them, not
    the classifier's. Callers run in a worker thread; Edge's scroll and numpy's conversion of a
    page each hold the GIL throughout, keeping the event loop waiting, so the pages are small."""
    for page in pages(shard, where, vectors=True, payload=payload, limit=_VECTOR_PAGE):
        vectors = np.asarray([r.vector for r in page], dtype=np.float32).reshape(-1, dimension)
        yield [str(r.id) for r in page], vectors, [r.payload for r in page]


_VECTOR_PAGE = 250
"""Points per page of :func:`vector_pages` (docs/reliability.md has the measurements)."""


def stack_pages(
    pages: Iterable[tuple[list[str], Matrix, list[Payload | None]]], capacity: int, dimension: int
) -> tuple[list[SnapshotRecord], Matrix]:
    """The points of ``pages`` as a snapshot's records, their vectors in one matrix, allocated
    for ``capacity`` rows and grown if the pages hold more (points written while they were
    read)."""
    records: list[SnapshotRecord] = []
    matrix = np.empty((capacity, dimension), dtype=np.float32)
    for ids, vectors, payloads in pages:
        start, end = len(records), len(records) + len(ids)
        if end > len(matrix):
            matrix = np.concatenate([matrix[:start], vectors])
        else:
            matrix[start:end] = vectors
        records.extend(map(SnapshotRecord, ids, map(read_fields, payloads)))
    return records, matrix[: len(records)]


def count_points(shard: qe.EdgeShard, where: qe.Filter) -> int:
    return shard.count(qe.CountRequest(exact=True, filter=where))
