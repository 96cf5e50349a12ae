"""The Qdrant server store: ``qdrant_client.AsyncQdrantClient``, one collection per dimension.

Collections follow Qdrant's multitenancy recipe: an ``is_tenant`` keyword index on
``classifier``, and HNSW graphs built per tenant (``payload_m``) instead of one global graph
(``m=0``). ``label`` has a keyword index (deletes and counts by label) and ``out_of_scope`` a
bool index: filters test whether that key is there (``IsEmpty``), which Qdrant answers from the
null index it builds beside every payload index (since 1.13.5) instead of reading payloads.
Queries are exact (``SearchParams(exact=True)``), as Evaluate's neighbours are (docs/design.md).
With ``quantize_from`` set, collections created for that width or wider keep int8 copies of the
vectors in RAM and the float32 vectors on disk, and their queries search the graphs over the
int8 copies and rescore the candidates with the float32 vectors: approximate, the price of the
memory. Writes use ``wait=True``: the call returns once the server has applied them. Any client
or server failure becomes :class:`Unavailable`, so callers see UNAVAILABLE instead of an
internal error.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import cast

import grpc
import httpx
import numpy as np
from qdrant_client import AsyncQdrantClient, models
from qdrant_client.conversions import common_types as types
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from ..errors import Unavailable
from .base import Matrix, Payload, Record, Selection, SnapshotRecord, Store, meta_point_id
from .compatibility import check_server_version
from .schema import (
    CLASSIFIER,
    LABEL,
    METADATA,
    OUT_OF_SCOPE,
    ExemplarPayload,
    read_fields,
    read_payload,
    stored_payload,
)

log = logging.getLogger(__name__)

_FACET_LIMIT = 1_000_000
_WITHOUT_METADATA = models.PayloadSelectorExclude(exclude=[METADATA])
"""The payload selector of a snapshot's read (``Store.vectors``)."""
_INT8 = models.ScalarQuantization(
    scalar=models.ScalarQuantizationConfig(
        type=models.ScalarType.INT8, quantile=0.99, always_ram=True
    )
)
_EXACT = models.SearchParams(exact=True)
_QUANTIZED = models.SearchParams(
    hnsw_ef=256, quantization=models.QuantizationSearchParams(rescore=True, oversampling=2.0)
)
"""Qdrant ignores quantized vectors in an exact search (it would scan the float32 vectors on
disk), so quantized widths walk the graph over the int8 vectors, with the ``hnsw_ef`` measured to
keep recall, and rank twice the asked-for candidates again by their float32 vectors."""
_CLIENT_FAILURES = (
    UnexpectedResponse,
    ResponseHandlingException,
    grpc.RpcError,
    httpx.HTTPError,
    OSError,
    TimeoutError,
)


@dataclass(frozen=True)
class ClusterLayout:
    """How each collection the store creates is spread over a Qdrant cluster's nodes; None
    leaves Qdrant's default. Used only when a collection is created: one that exists keeps the
    values it was created with (docs/scaling.md says how to change them)."""

    shard_number: int | None = None
    replication_factor: int | None = None
    write_consistency_factor: int | None = None


class QdrantServerStore(Store):
    def __init__(
        self,
        client: AsyncQdrantClient,
        prefix: str,
        quantize_from: int | None = None,
        layout: ClusterLayout | None = None,
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._quantize_from = quantize_from
        self._layout = layout or ClusterLayout()

    def _quantized(self, dimension: int) -> bool:
        return self._quantize_from is not None and dimension >= self._quantize_from

    def _collection(self, dimension: int) -> str:
        return f"{self._prefix}_d{dimension}"

    @property
    def _meta(self) -> str:
        return f"{self._prefix}_meta"

    async def existing_dimensions(self) -> list[int]:
        head = f"{self._prefix}_d"
        async with _unavailable_on_failure():
            response = await self._client.get_collections()
        return sorted(
            int(c.name[len(head) :])
            for c in response.collections
            if c.name.startswith(head) and c.name[len(head) :].isdigit()
        )

    async def open(self, dimensions: Sequence[int]) -> None:
        async with _unavailable_on_failure():
            check_server_version((await self._client.info()).version)
            await self._ensure_collection(self._meta, 1, tenant_index=False)
            for dimension in dimensions:
                await self._ensure_collection(self._collection(dimension), dimension)

    async def _ensure_collection(self, name: str, size: int, *, tenant_index: bool = True) -> None:
        if await self._client.collection_exists(name):
            if tenant_index:
                await self._ensure_out_of_scope_index(name)
            return
        quantized = tenant_index and self._quantized(size)
        await self._client.create_collection(
            name,
            vectors_config=models.VectorParams(
                size=size,
                distance=models.Distance.COSINE,
                on_disk=True if quantized else None,
                quantization_config=_INT8 if quantized else None,
            ),
            hnsw_config=models.HnswConfigDiff(m=0, payload_m=16) if tenant_index else None,
            shard_number=self._layout.shard_number,
            replication_factor=self._layout.replication_factor,
            write_consistency_factor=self._layout.write_consistency_factor,
        )
        if tenant_index:
            await self._client.create_payload_index(
                name,
                CLASSIFIER,
                field_schema=models.KeywordIndexParams(
                    type=models.KeywordIndexType.KEYWORD, is_tenant=True
                ),
                wait=True,
            )
            await self._client.create_payload_index(
                name, LABEL, field_schema=models.PayloadSchemaType.KEYWORD, wait=True
            )
            await self._create_out_of_scope_index(name)
        log.info("created collection %s (size %d)", name, size)

    async def _ensure_out_of_scope_index(self, name: str) -> None:
        """Indexes ``out_of_scope`` in a collection created before negative exemplars existed
        (once: the collection then lists the index in its payload schema)."""
        info = await self._client.get_collection(name)
        if OUT_OF_SCOPE not in (info.payload_schema or {}):
            await self._create_out_of_scope_index(name)
            log.info("indexed %s in collection %s", OUT_OF_SCOPE, name)

    async def _create_out_of_scope_index(self, name: str) -> None:
        await self._client.create_payload_index(
            name, OUT_OF_SCOPE, field_schema=models.PayloadSchemaType.BOOL, wait=True
        )

    async def close(self) -> None:
        await self._client.close()

    # Meta records ----------------------------------------------------------------------------

    async def get_meta(self, key: str) -> Payload | None:
        async with _unavailable_on_failure():
            records = await self._client.retrieve(self._meta, [meta_point_id(key)])
        return dict(records[0].payload or {}) if records else None

    async def put_meta(self, key: str, payload: Payload) -> None:
        point = models.PointStruct(
            id=meta_point_id(key), vector=[1.0], payload={**payload, "key": key}
        )
        async with _unavailable_on_failure():
            await self._client.upsert(self._meta, [point], wait=True)

    async def update_meta(self, key: str, fields: Payload, where: Payload) -> None:
        # One filtered set_payload: the server applies it to the point only if the filter
        # matches when it runs, so it cannot interleave with another replica's write.
        conditions: list[models.Condition] = [models.HasIdCondition(has_id=[meta_point_id(key)])]
        conditions += [
            models.IsEmptyCondition(is_empty=models.PayloadField(key=name))
            if value is None
            else models.FieldCondition(key=name, match=models.MatchValue(value=value))
            for name, value in where.items()
        ]
        async with _unavailable_on_failure():
            await self._client.set_payload(
                self._meta, fields, points=models.Filter(must=conditions), wait=True
            )

    async def delete_meta(self, key: str) -> None:
        selector = models.PointIdsList(points=[meta_point_id(key)])
        async with _unavailable_on_failure():
            await self._client.delete(self._meta, selector, wait=True)

    async def list_meta(self, kind: str) -> list[Payload]:
        where = models.Filter(
            must=[models.FieldCondition(key="kind", match=models.MatchValue(value=kind))]
        )
        return [dict(point.payload or {}) for point in await self._scroll_all(self._meta, where)]

    async def _scroll_all(
        self,
        collection: str,
        where: models.Filter,
        *,
        payload: bool | models.PayloadSelectorExclude = True,
        vectors: bool = False,
    ) -> list[models.Record]:
        points: list[models.Record] = []
        offset: types.PointId | None = None
        async with _unavailable_on_failure():
            while True:
                page, offset = await self._client.scroll(
                    collection,
                    where,
                    limit=1000,
                    offset=offset,
                    with_payload=payload,
                    with_vectors=vectors,
                )
                points.extend(page)
                if offset is None:
                    return points

    # Exemplars -------------------------------------------------------------------------------

    async def upsert(
        self,
        dimension: int,
        ids: Sequence[str],
        vectors: Matrix,
        payloads: Sequence[ExemplarPayload],
    ) -> None:
        batch = models.Batch(
            ids=list(ids), vectors=vectors.tolist(), payloads=[stored_payload(p) for p in payloads]
        )
        async with _unavailable_on_failure():
            await self._client.upsert(self._collection(dimension), batch, wait=True)

    async def delete(self, dimension: int, selection: Selection) -> None:
        selector = models.FilterSelector(filter=_filter(selection))
        async with _unavailable_on_failure():
            await self._client.delete(self._collection(dimension), selector, wait=True)

    async def count(self, dimension: int, selection: Selection) -> int:
        async with _unavailable_on_failure():
            result = await self._client.count(
                self._collection(dimension), _filter(selection), exact=True
            )
        return result.count

    async def label_counts(
        self, dimension: int, classifier: str, out_of_scope: bool | None = None
    ) -> dict[str, int]:
        async with _unavailable_on_failure():
            response = await self._client.facet(
                self._collection(dimension),
                LABEL,
                facet_filter=_filter(Selection(classifier, out_of_scope=out_of_scope)),
                limit=_FACET_LIMIT,
                exact=True,
            )
        return {str(hit.value): hit.count for hit in response.hits}

    async def classifier_counts(self, dimension: int) -> dict[str, int]:
        async with _unavailable_on_failure():
            response = await self._client.facet(
                self._collection(dimension), CLASSIFIER, limit=_FACET_LIMIT, exact=True
            )
        return {str(hit.value): hit.count for hit in response.hits}

    async def scroll(
        self, dimension: int, selection: Selection, limit: int, offset: str | None
    ) -> tuple[list[Record], str | None]:
        async with _unavailable_on_failure():
            records, next_offset = await self._client.scroll(
                self._collection(dimension),
                _filter(selection),
                limit=limit,
                offset=offset,
                with_payload=True,
            )
        page = [Record(str(record.id), read_payload(record.payload)) for record in records]
        return page, None if next_offset is None else str(next_offset)

    async def point_ids(self, dimension: int, classifier: str) -> set[str]:
        where = _filter(Selection(classifier))
        points = await self._scroll_all(self._collection(dimension), where, payload=False)
        return {str(point.id) for point in points}

    async def retrieve(self, dimension: int, ids: Sequence[str]) -> tuple[list[Record], Matrix]:
        async with _unavailable_on_failure():
            points = await self._client.retrieve(
                self._collection(dimension), list(ids), with_payload=True, with_vectors=True
            )
        records = [Record(str(p.id), read_payload(p.payload)) for p in points]
        return records, _matrix(points, dimension)

    async def vectors(self, dimension: int, classifier: str) -> tuple[list[SnapshotRecord], Matrix]:
        where = _filter(Selection(classifier))
        points = await self._scroll_all(
            self._collection(dimension), where, payload=_WITHOUT_METADATA, vectors=True
        )
        records = [SnapshotRecord(str(p.id), read_fields(p.payload)) for p in points]
        return records, _matrix(points, dimension)

    async def query(
        self,
        dimension: int,
        classifier: str,
        vectors: Matrix,
        k: int,
        out_of_scope: bool | None = None,
    ) -> list[list[Record]]:
        tenant = _filter(Selection(classifier, out_of_scope=out_of_scope))
        params = _QUANTIZED if self._quantized(dimension) else _EXACT
        requests = [
            models.QueryRequest(
                query=vector, filter=tenant, limit=k, with_payload=True, params=params
            )
            for vector in vectors.tolist()
        ]
        async with _unavailable_on_failure():
            responses = await self._client.query_batch_points(self._collection(dimension), requests)
        return [
            [Record(str(p.id), read_payload(p.payload), p.score) for p in response.points]
            for response in responses
        ]


def _matrix(points: Sequence[models.Record], dimension: int) -> Matrix:
    rows = [cast(list[float], p.vector) for p in points]
    return np.asarray(rows, dtype=np.float32).reshape(-1, dimension)


def _filter(selection: Selection) -> models.Filter:
    must: list[models.Condition] = [
        models.FieldCondition(key=CLASSIFIER, match=models.MatchValue(value=selection.classifier))
    ]
    if selection.label is not None:
        must.append(
            models.FieldCondition(key=LABEL, match=models.MatchValue(value=selection.label))
        )
    if selection.ids is not None:
        must.append(models.HasIdCondition(has_id=list(selection.ids)))
    in_scope = models.IsEmptyCondition(is_empty=models.PayloadField(key=OUT_OF_SCOPE))
    if selection.out_of_scope is False:  # as the embedded store filters (schema.OUT_OF_SCOPE)
        must.append(in_scope)
    if selection.out_of_scope is True:
        return models.Filter(must=must, must_not=[in_scope])
    return models.Filter(must=must)


@asynccontextmanager
async def _unavailable_on_failure() -> AsyncIterator[None]:
    """Turns a failure of the Qdrant client (network, HTTP or gRPC status) into Unavailable."""
    try:
        yield
    except _CLIENT_FAILURES as exc:
        log.warning("Qdrant call failed: %r", exc)
        raise Unavailable("the vector store (Qdrant) is unavailable") from exc
