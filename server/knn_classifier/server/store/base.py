"""The store interface: what the service needs from a vector database, and nothing more.

Exemplars live in one collection per dimension, each point carrying the same id and payload in
every collection. Small records (classifiers, the embedder fingerprint) live in a ``meta``
collection of the same store, so that service replicas sharing a Qdrant server share them too.
Every exemplar operation is scoped to one classifier.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from ..vectors import Matrix as Matrix  # the stores take and give vectors of this type
from .schema import ExemplarFields, ExemplarPayload

Payload = dict[str, Any]
"""A meta record (classifier records, the embedder fingerprint); exemplars have
:class:`ExemplarPayload`."""

_META_NAMESPACE = uuid.UUID("5b0c1f49-96a5-4fa9-a3c2-0d3d3c4a7e10")


def meta_point_id(key: str) -> str:
    """The point id of a meta record: stable, so a key is written in one place only."""
    return str(uuid.uuid5(_META_NAMESPACE, key))


@dataclass(frozen=True, slots=True)
class Record:
    """A stored exemplar point: its id, payload and, for query results, its cosine similarity."""

    id: str
    payload: ExemplarPayload
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class SnapshotRecord:
    """A point of a snapshot of a classifier (:meth:`Store.vectors`): its id and its payload
    without metadata, a dict of the caller's own."""

    id: str
    payload: ExemplarFields


@dataclass(frozen=True, slots=True)
class Selection:
    """Which exemplars of one classifier an operation touches: all, by ids, or by label; and
    of those, with ``out_of_scope`` set, only the negative exemplars (True) or only the others
    (False)."""

    classifier: str
    ids: Sequence[str] | None = None
    label: str | None = None
    out_of_scope: bool | None = None


class Store(ABC):
    """A vector store with one exemplar collection per dimension and a meta collection."""

    shared: ClassVar[bool] = True
    """Whether other processes (service replicas) may write the same store: writes to a
    classifier's exemplars then take its cross-replica write lease (``leases.py``)."""

    @abstractmethod
    async def open(self, dimensions: Sequence[int]) -> None:
        """Opens or creates the collections for ``dimensions`` and the meta collection."""

    @abstractmethod
    async def close(self) -> None:
        """Releases the store; every acknowledged write is already durable."""

    @abstractmethod
    async def existing_dimensions(self) -> list[int]:
        """Dimensions that have an exemplar collection, before :meth:`open` creates any."""

    # Meta records ----------------------------------------------------------------------------

    @abstractmethod
    async def get_meta(self, key: str) -> Payload | None: ...

    @abstractmethod
    async def put_meta(self, key: str, payload: Payload) -> None: ...

    @abstractmethod
    async def update_meta(self, key: str, fields: Payload, where: Payload) -> None:
        """Sets ``fields`` on the record ``key`` if it exists and each field of ``where`` has
        the given value (None: the record has no such field, or null), in one step of the store
        (a compare-and-set that replicas sharing the store cannot interleave); else does nothing.
        Read the record back to learn which."""

    @abstractmethod
    async def delete_meta(self, key: str) -> None: ...

    @abstractmethod
    async def list_meta(self, kind: str) -> list[Payload]:
        """Meta records whose payload has ``kind`` equal to ``kind``."""

    # Exemplars -------------------------------------------------------------------------------

    @abstractmethod
    async def upsert(
        self,
        dimension: int,
        ids: Sequence[str],
        vectors: Matrix,
        payloads: Sequence[ExemplarPayload],
    ) -> None:
        """Writes points durably; returns once they survive a crash of this process."""

    @abstractmethod
    async def delete(self, dimension: int, selection: Selection) -> None: ...

    @abstractmethod
    async def count(self, dimension: int, selection: Selection) -> int: ...

    @abstractmethod
    async def label_counts(
        self, dimension: int, classifier: str, out_of_scope: bool | None = None
    ) -> dict[str, int]:
        """Label -> number of points of ``classifier`` (with ``out_of_scope``: of the negative
        exemplars only, or of the others)."""

    @abstractmethod
    async def classifier_counts(self, dimension: int) -> dict[str, int]:
        """Classifier name -> number of points in ``dimension``, for every classifier that has
        points there, whether or not it has a record (start-up uses it to find exemplars whose
        record was lost)."""

    @abstractmethod
    async def scroll(
        self, dimension: int, selection: Selection, limit: int, offset: str | None
    ) -> tuple[list[Record], str | None]:
        """A page of points in id order and the offset of the next page (None: last page)."""

    @abstractmethod
    async def point_ids(self, dimension: int, classifier: str) -> set[str]:
        """The ids of every point of ``classifier``."""

    @abstractmethod
    async def retrieve(self, dimension: int, ids: Sequence[str]) -> tuple[list[Record], Matrix]:
        """The points with these ids that exist, with their vectors (row i is record i)."""

    @abstractmethod
    async def vectors(self, dimension: int, classifier: str) -> tuple[list[SnapshotRecord], Matrix]:
        """Every point of ``classifier`` and its stored vector (row i belongs to record i), in
        id order. The payloads leave the metadata out: the callers (label models, Evaluate) read
        none, and building it again for each point of a large classifier cost the embedded
        store's snapshot as much as the rest of its records (docs/reliability.md); read it with
        :meth:`scroll`, :meth:`retrieve` or :meth:`query`."""

    @abstractmethod
    async def query(
        self,
        dimension: int,
        classifier: str,
        vectors: Matrix,
        k: int,
        out_of_scope: bool | None = None,
    ) -> list[list[Record]]:
        """For each row of ``vectors``, the ``k`` most similar points, most similar first; with
        ``out_of_scope``, among the negative exemplars only (True) or the others (False)."""
