"""The payload indexes of the Qdrant server store's exemplar collections, on new collections and
on collections created before an index existed.

The local stand-in (``AsyncQdrantClient(":memory:")``) accepts payload indexes and reports none
(its collection info's ``payload_schema`` is always empty), so, as in
:mod:`test_cluster_layout`, the check runs the production path (Settings -> the store ->
qdrant-client over gRPC) to a fake server that keeps each CreateFieldIndex request and reports
the indexes it holds in its collection info, as Qdrant does.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from qdrant_client.grpc import collections_pb2, points_pb2

from knn_classifier.server.app import build_store

from .test_cluster_layout import FakeQdrant, serving, store_settings


class IndexingQdrant(FakeQdrant):
    """Also keeps each collection's payload indexes (field -> FieldType) and answers
    GetCollectionInfo with them as its payload schema."""

    def __init__(self) -> None:
        super().__init__()
        self.indexes: dict[str, dict[str, int]] = {}
        self.index_requests: list[tuple[str, str]] = []

    def CreateFieldIndex(self, request: points_pb2.CreateFieldIndexCollection, context: Any) -> Any:
        self.index_requests.append((request.collection_name, request.field_name))
        self.indexes.setdefault(request.collection_name, {})[request.field_name] = (
            request.field_type
        )
        return super().CreateFieldIndex(request, context)

    def Get(self, request: collections_pb2.GetCollectionInfoRequest, context: Any) -> Any:
        schema = {
            field: collections_pb2.PayloadSchemaInfo(data_type=_SCHEMA_TYPES[field_type])
            for field, field_type in self.indexes.get(request.collection_name, {}).items()
        }
        info = collections_pb2.CollectionInfo(
            status=collections_pb2.CollectionStatus.Green, config=_CONFIG, payload_schema=schema
        )
        return collections_pb2.GetCollectionInfoResponse(result=info, time=0.0)


_CONFIG = collections_pb2.CollectionConfig(  # the fields qdrant-client requires, as Qdrant's
    params=collections_pb2.CollectionParams(
        shard_number=1, replication_factor=1, write_consistency_factor=1
    ),
    hnsw_config=collections_pb2.HnswConfigDiff(m=0, ef_construct=100, full_scan_threshold=10000),
    optimizer_config=collections_pb2.OptimizersConfigDiff(
        deleted_threshold=0.2,
        vacuum_min_vector_number=1000,
        default_segment_number=0,
        flush_interval_sec=5,
    ),
    wal_config=collections_pb2.WalConfigDiff(wal_capacity_mb=32, wal_segments_ahead=0),
)
_SCHEMA_TYPES: dict[int, collections_pb2.PayloadSchemaType.ValueType] = {
    points_pb2.FieldType.FieldTypeKeyword: collections_pb2.PayloadSchemaType.Keyword,
    points_pb2.FieldType.FieldTypeBool: collections_pb2.PayloadSchemaType.Bool,
}


@pytest.fixture
def fake() -> Iterator[tuple[int, IndexingQdrant]]:
    """An IndexingQdrant on a free port; yields the port and the fake."""
    made = IndexingQdrant()
    with serving(made) as port:
        yield port, made


async def open_store(tmp_path: Path, port: int) -> None:
    settings = store_settings(tmp_path, port)
    store = build_store(settings)
    await store.open(settings.dimensions)
    await store.close()


async def test_new_collections_index_the_out_of_scope_flag_as_a_bool(
    tmp_path: Path, fake: tuple[int, IndexingQdrant]
) -> None:
    port, qdrant = fake
    await open_store(tmp_path, port)
    for collection in ("knn_d8", "knn_d16"):
        assert qdrant.indexes[collection] == {
            "classifier": points_pb2.FieldType.FieldTypeKeyword,
            "label": points_pb2.FieldType.FieldTypeKeyword,
            "out_of_scope": points_pb2.FieldType.FieldTypeBool,
        }
    assert "knn_meta" not in qdrant.indexes
    # Opened again, the collections list the index: nothing is asked again.
    asked = len(qdrant.index_requests)
    await open_store(tmp_path, port)
    assert len(qdrant.index_requests) == asked


async def test_a_collection_created_before_the_index_gets_it_at_start_once(
    tmp_path: Path, fake: tuple[int, IndexingQdrant]
) -> None:
    port, qdrant = fake
    await open_store(tmp_path, port)
    for collection in ("knn_d8", "knn_d16"):  # as an older version left them
        del qdrant.indexes[collection]["out_of_scope"]
    qdrant.index_requests.clear()

    await open_store(tmp_path, port)
    assert sorted(qdrant.index_requests) == [
        ("knn_d16", "out_of_scope"),
        ("knn_d8", "out_of_scope"),
    ]
    assert qdrant.indexes["knn_d8"]["out_of_scope"] == points_pb2.FieldType.FieldTypeBool
    await open_store(tmp_path, port)
    assert len(qdrant.index_requests) == 2
