"""Shards, replicas and write quorum of the Qdrant server store's collections (issue 12, part 7).

The local stand-in (``AsyncQdrantClient(":memory:")``) ignores these arguments, so the check
runs the production path instead: Settings -> ``app.build_store`` -> the store -> qdrant-client
over gRPC, to a server that answers the four calls opening a store makes as Qdrant does and keeps
each CreateCollection request, in Qdrant's own protobuf message, as it arrived on the wire.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError
from qdrant_client import AsyncQdrantClient
from qdrant_client.grpc import (
    collections_pb2,
    collections_service_pb2_grpc,
    points_pb2,
    points_service_pb2_grpc,
    qdrant_pb2,
    qdrant_pb2_grpc,
)

from knn_classifier.server.app import build_store
from knn_classifier.server.settings import Settings
from knn_classifier.server.store.qdrant_server import QdrantServerStore


class FakeQdrant(
    qdrant_pb2_grpc.QdrantServicer,
    collections_service_pb2_grpc.CollectionsServicer,
    points_service_pb2_grpc.PointsServicer,
):
    """Answers the calls that open a store as Qdrant does (any other call: UNIMPLEMENTED) and
    keeps every CreateCollection request."""

    def __init__(self) -> None:
        self.created: dict[str, collections_pb2.CreateCollection] = {}

    def HealthCheck(self, request: Any, context: Any) -> qdrant_pb2.HealthCheckReply:
        version = importlib.metadata.version("qdrant-client")
        return qdrant_pb2.HealthCheckReply(title="qdrant - vector search engine", version=version)

    def CollectionExists(self, request: Any, context: Any) -> Any:
        exists = collections_pb2.CollectionExists(exists=request.collection_name in self.created)
        return collections_pb2.CollectionExistsResponse(result=exists, time=0.0)

    def Create(self, request: collections_pb2.CreateCollection, context: Any) -> Any:
        self.created[request.collection_name] = request
        return collections_pb2.CollectionOperationResponse(result=True, time=0.0)

    def CreateFieldIndex(self, request: Any, context: Any) -> Any:
        done = points_pb2.UpdateResult(operation_id=0, status=points_pb2.UpdateStatus.Completed)
        return points_pb2.PointsOperationResponse(result=done, time=0.0)


@pytest.fixture
def qdrant() -> Iterator[tuple[int, FakeQdrant]]:
    """The fake on a free port; yields the port and the fake."""
    fake = FakeQdrant()
    with serving(fake) as port:
        yield port, fake


@contextmanager
def serving(fake: FakeQdrant) -> Iterator[int]:
    """Serves ``fake`` on a free port, which it yields."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    qdrant_pb2_grpc.add_QdrantServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    collections_service_pb2_grpc.add_CollectionsServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    points_service_pb2_grpc.add_PointsServicer_to_server(fake, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=None)


def store_settings(tmp_path: Path, port: int, **store: Any) -> Settings:
    return Settings(
        data_dir=tmp_path,
        dimensions=[8, 16],
        store={"url": "http://127.0.0.1:1", "grpc_port": port, **store},
    )


async def test_the_collections_are_created_with_the_configured_shards_replicas_and_quorum(
    tmp_path: Path, qdrant: tuple[int, FakeQdrant]
) -> None:
    port, record = qdrant
    settings = store_settings(
        tmp_path, port, shard_number=6, replication_factor=3, write_consistency_factor=2
    )
    store = build_store(settings)
    assert isinstance(store, QdrantServerStore)
    await store.open(settings.dimensions)
    await store.close()
    assert sorted(record.created) == ["knn_d16", "knn_d8", "knn_meta"]
    for name, request in record.created.items():
        layout = (
            request.shard_number,
            request.replication_factor,
            request.write_consistency_factor,
        )
        assert layout == (6, 3, 2), name
    assert record.created["knn_d16"].vectors_config.params.size == 16


async def test_unset_they_are_left_to_qdrant(
    tmp_path: Path, qdrant: tuple[int, FakeQdrant]
) -> None:
    """Unset, the request carries none of the three: Qdrant applies its own defaults (shards:
    the number of nodes; one copy; a quorum of one), as before these settings existed."""
    port, record = qdrant
    settings = store_settings(tmp_path, port)
    store = build_store(settings)
    await store.open(settings.dimensions)
    await store.close()
    assert len(record.created) == 3
    for name, request in record.created.items():
        for field in ("shard_number", "replication_factor", "write_consistency_factor"):
            assert not request.HasField(field), (name, field)


async def test_the_local_stand_in_accepts_and_ignores_them(tmp_path: Path) -> None:
    """The local Qdrant the other tests use takes the three and drops them: it has no shards,
    which is why the tests above run against the fake server instead."""
    from knn_classifier.server.store.qdrant_server import ClusterLayout

    client = AsyncQdrantClient(location=":memory:")
    store = QdrantServerStore(client, "knn", layout=ClusterLayout(6, 3, 2))
    await store.open([8])
    params = (await client.get_collection("knn_d8")).config.params
    assert (params.shard_number, params.replication_factor, params.write_consistency_factor) == (
        None,
        None,
        None,
    )
    await store.close()


@pytest.mark.parametrize(
    ("store", "message"),
    [
        ({"shard_number": 0}, "shard_number"),
        ({"replication_factor": 0}, "replication_factor"),
        ({"write_consistency_factor": 0}, "write_consistency_factor"),
        ({"replication_factor": 2, "write_consistency_factor": 3}, "exceeds the 2 copies"),
        ({"write_consistency_factor": 2}, "exceeds the 1 copies"),
    ],
)
def test_values_qdrant_would_refuse_are_refused_at_start_up(
    store: dict[str, int], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(store=store)


def test_a_write_quorum_of_every_replica_is_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNN_STORE__REPLICATION_FACTOR", "2")
    monkeypatch.setenv("KNN_STORE__WRITE_CONSISTENCY_FACTOR", "2")
    store = Settings().store
    assert (store.shard_number, store.replication_factor, store.write_consistency_factor) == (
        None,
        2,
        2,
    )
