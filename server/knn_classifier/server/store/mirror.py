"""An in-memory copy of one classifier's vectors in one dimension, searched with numpy.

The embedded store keeps its data in Qdrant Edge and answers nearest-neighbour queries from
these copies: an exact search by one matrix product over a classifier's vectors costs a fraction
of Edge's filtered exact search plus its payload reads (measured in docs/benchmarks.md). A copy
holds each point's id and payload, so it can also answer for all of the classifier's points
(:meth:`Mirror.frozen`, then :meth:`FrozenMirror.snapshot`). Payloads are held packed, out of the
garbage collector's sight (:mod:`.packed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .base import Matrix, Record, Selection, SnapshotRecord
from .packed import PackedPayload, fields, pack, unpack
from .schema import ExemplarPayload


class Mirror:
    def __init__(self, dimension: int, capacity: int = 16) -> None:
        """``capacity``: the rows to allocate at once; loading a stored classifier allocates
        :func:`room_for` its size, so that the copy is filled in place rather than grown and
        copied, and the writes after the load fill it in place too, where the first grew it
        (a copy of the whole matrix, on the event loop)."""
        self._matrix: Matrix = np.empty((capacity, dimension), dtype=np.float32)
        self._negative = np.zeros(capacity, dtype=bool)
        """Row i is a negative exemplar's (its payload's ``out_of_scope``)."""
        self._count = 0
        self._ids = np.empty(capacity, dtype=object)
        """Row i's point id; this and ``_payloads`` are numpy arrays, which the garbage
        collector does not visit, where each full collection visited every item of a list."""
        self._payloads = np.empty(capacity, dtype=object)
        """Row i's payload, packed (:mod:`.packed`)."""
        self._rows: dict[str, int] = {}

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        """The rows allocated: upserts beyond it grow the copy."""
        return len(self._matrix)

    def upsert(
        self, ids: Sequence[str], vectors: Matrix, payloads: Sequence[ExemplarPayload]
    ) -> None:
        """Adds or replaces points; vectors are normalised, as a cosine collection does."""
        for point_id, vector, payload in zip(ids, _unit(vectors), payloads, strict=True):
            packed = pack(payload)
            row = self._rows.get(point_id)
            if row is None:
                row = self._append(point_id, packed)
            self._matrix[row] = vector
            self._negative[row] = payload.get("out_of_scope", False)
            self._payloads[row] = packed

    def delete(self, selection: Selection) -> None:
        """Removes the points ``selection`` names (its classifier is this copy's)."""
        if selection.ids is None:
            rows = np.arange(self._count)
        else:
            rows = np.array(self._id_rows(selection.ids), dtype=np.intp)
        if selection.out_of_scope is not None:
            rows = rows[self._negative[rows] == selection.out_of_scope]
        if selection.label is not None:
            payloads, label = self._payloads, selection.label
            rows = rows[np.array([payloads[row]["label"] == label for row in rows.tolist()], bool)]
        self._remove(rows)

    def query(
        self, vectors: Matrix, k: int, out_of_scope: bool | None = None
    ) -> list[list[Record]]:
        """For each row of ``vectors``, the ``k`` points of highest cosine similarity; with
        ``out_of_scope``, among the negative exemplars only (True) or the others (False)."""
        if out_of_scope is None:
            candidates, matrix = None, self._matrix[: self._count]
        else:
            candidates = np.flatnonzero(self._negative[: self._count] == out_of_scope)
            matrix = self._matrix[candidates]
        size = len(matrix)
        if size == 0:
            return [[] for _ in vectors]
        scores = _unit(vectors) @ matrix.T
        if k < size:
            top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(size), scores.shape)
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        chosen = np.take_along_axis(top, order, axis=1)
        rows = (chosen if candidates is None else candidates[chosen]).tolist()
        similarities = np.take_along_axis(top_scores, order, axis=1).tolist()
        return [
            [
                Record(self._ids[row], unpack(self._payloads[row]), score)
                for row, score in zip(hit_rows, hit_scores, strict=True)
            ]
            for hit_rows, hit_scores in zip(rows, similarities, strict=True)
        ]

    def frozen(self) -> FrozenMirror:
        """The points as they are now, in id order as a store's scroll gives them, in a copy
        later writes do not change: the rows gathered by numpy, the id and payload arrays copied
        (references only). Meant for a worker thread, while nothing writes to this copy: numpy
        sorts and gathers without holding the GIL, so the event loop runs meanwhile.
        :meth:`FrozenMirror.snapshot` then builds the records, a Python object per point,
        outside that hold."""
        ids = self._ids[: self._count].copy()
        order = _id_order(ids)
        payloads = self._payloads[: self._count].copy()
        return FrozenMirror(ids, payloads, order, np.take(self._matrix, order, 0))

    def _id_rows(self, ids: Sequence[str]) -> list[int]:
        return [self._rows[point_id] for point_id in set(ids) if point_id in self._rows]

    def _append(self, point_id: str, payload: PackedPayload) -> int:
        if self._count == len(self._matrix):
            rows = room_for(len(self._matrix))
            self._matrix = _grown(self._matrix, rows, self._count)
            self._negative = _grown(self._negative, rows, self._count)
            self._ids = _grown(self._ids, rows, self._count)
            self._payloads = _grown(self._payloads, rows, self._count)
        row = self._count
        self._count += 1
        self._ids[row] = point_id
        self._payloads[row] = payload
        self._rows[point_id] = row
        return row

    def _remove(self, rows: np.ndarray) -> None:
        """Deletes ``rows`` (distinct) by moving the rows kept beyond the new count into the
        places of those deleted below it, by numpy; Python only updates the moved ids' rows."""
        count = self._count - len(rows)
        for row in rows.tolist():
            del self._rows[self._ids[row]]
        holes = np.sort(rows[rows < count])
        tail = np.arange(count, self._count)
        movers = tail[~np.isin(tail, rows)]
        self._matrix[holes] = self._matrix[movers]
        self._negative[holes] = self._negative[movers]
        self._ids[holes] = self._ids[movers]
        self._payloads[holes] = self._payloads[movers]
        for hole in holes.tolist():
            self._rows[self._ids[hole]] = hole
        self._ids[count : self._count] = None  # the references dropped
        self._payloads[count : self._count] = None
        self._count = count


@dataclass(frozen=True, slots=True)
class FrozenMirror:
    """A copy of a :class:`Mirror`'s points at one moment: ``ids[order[i]]`` is the id of
    ``matrix`` row i, whose payload is ``payloads[order[i]]``."""

    ids: np.ndarray
    payloads: np.ndarray
    order: np.ndarray
    matrix: Matrix

    def snapshot(self) -> tuple[list[SnapshotRecord], Matrix]:
        """Every point and its vector (row i belongs to record i), in id order; the payloads
        without metadata (``Store.vectors``)."""
        ids, payloads = self.ids, self.payloads
        records = [SnapshotRecord(ids[row], fields(payloads[row])) for row in self.order.tolist()]
        return records, self.matrix


def room_for(rows: int) -> int:
    """The capacity a copy of ``rows`` rows grows to: a quarter more, not double, since growing
    holds the old and the new matrix at once."""
    return max(16, rows + rows // 4)


def query_work(queries: int, points: int, dimension: int, k: int) -> int:
    """An estimate of the work of :meth:`Mirror.query`, in multiply-adds of its matrix product:
    the product; a pass over the matrix, which bounds a query of few vectors by memory; the
    partition of each vector's scores; and a record per hit. The weights of the last three are
    their costs measured relative to a multiply-add (docs/reliability.md)."""
    hits = min(k, points)
    return points * dimension * (queries + 8) + queries * (points * 240 + hits * 40_000)


def _id_order(ids: np.ndarray) -> np.ndarray:
    """The order that sorts ``ids``, by numpy: Python's ``sorted`` holds the GIL for the whole
    sort, and so does numpy's conversion of a list of strings, so they are converted a slice at a
    time. (Numpy orders strings by code point, as Python does; ids are UUIDs, so none ends in
    the NUL numpy drops.)"""
    keys = np.empty(len(ids), dtype=f"U{max(map(len, ids), default=1)}")
    for start in range(0, len(ids), _SLICE):
        keys[start : start + _SLICE] = ids[start : start + _SLICE]
    return np.argsort(keys, kind="stable")


_SLICE = 10_000
"""Ids converted to numpy at a time, between which the GIL can pass to the event loop."""


def _grown(array: np.ndarray, rows: int, count: int) -> np.ndarray:
    """``array`` in ``rows`` rows, its first ``count`` copied."""
    grown = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
    grown[:count] = array[:count]
    return grown


def _unit(vectors: Matrix) -> Matrix:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    unit: Matrix = (vectors / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)
    return unit
