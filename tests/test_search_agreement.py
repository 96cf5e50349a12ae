"""Classify's search finds the neighbours Evaluate computes, on both stores.

Classify asks the store (``Store.query``); Evaluate reads the stored vectors (``Store.vectors``)
and computes exact neighbours with :func:`evaluate.nearest`. The server store runs on
``AsyncQdrantClient(":memory:")``, which always searches exactly, so its test also checks that
every search it sends asks the server for an exact one: a Qdrant server would otherwise walk
its HNSW graphs. Both are checked against a full sort of every similarity.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient, models

from knn_classifier.server import evaluate
from knn_classifier.server.store import EdgeStore, Store
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.server.store.schema import read_payload

DIMENSION = 16
K = 10


class RecordingQdrant:
    """AsyncQdrantClient(":memory:") that keeps the query requests it is sent."""

    def __init__(self) -> None:
        self._client = AsyncQdrantClient(location=":memory:")
        self.queries: list[models.QueryRequest] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    async def query_batch_points(
        self, collection_name: str, requests: list[models.QueryRequest], **kwargs: Any
    ) -> Any:
        self.queries.extend(requests)
        return await self._client.query_batch_points(collection_name, requests, **kwargs)


@pytest.fixture(params=["edge", "qdrant-server"])
async def store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Store, RecordingQdrant | None]]:
    qdrant = None
    if request.param == "edge":
        opened: Store = EdgeStore(tmp_path)
    else:
        qdrant = RecordingQdrant()
        opened = QdrantServerStore(qdrant, "test")  # type: ignore[arg-type]
    await opened.open([DIMENSION])
    yield opened, qdrant
    await opened.close()


def unit_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    rows = rng.standard_normal((count, DIMENSION)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


async def test_classify_searches_the_neighbours_evaluate_computes(
    store: tuple[Store, RecordingQdrant | None],
) -> None:
    opened, qdrant = store
    rng = np.random.default_rng(12)
    ids = [str(uuid.uuid4()) for _ in range(300)]
    payloads = [
        read_payload({"classifier": "c", "id": i, "label": f"l{n % 7}", "text": f"t{n}"})
        for n, i in enumerate(ids)
    ]
    await opened.upsert(DIMENSION, ids, unit_rows(rng, 300), payloads)
    other = [str(uuid.uuid4()) for _ in range(50)]  # another classifier's points, never found
    await opened.upsert(
        DIMENSION,
        other,
        unit_rows(rng, 50),
        [read_payload({"classifier": "d", "id": i, "label": "l", "text": "o"}) for i in other],
    )
    queries = unit_rows(rng, 40)

    found = await opened.query(DIMENSION, "c", queries, K)
    records, vectors = await opened.vectors(DIMENSION, "c")
    every = queries.astype(np.float64) @ vectors.astype(np.float64).T
    expected = [sorted(range(len(records)), key=lambda j: -row[j])[:K] for row in every.tolist()]
    assert [[r.id for r in row] for row in found] == [
        [records[i].id for i in row] for row in expected
    ]
    assert np.array([[r.score for r in row] for row in found]) == pytest.approx(
        np.take_along_axis(every, np.array(expected), axis=1), abs=1e-5
    )
    indices, similarities = evaluate.nearest(queries, vectors, K)
    assert indices.tolist() == expected
    np.testing.assert_allclose(similarities, np.take_along_axis(every, indices, axis=1), atol=1e-5)
    if qdrant is not None:
        assert qdrant.queries  # the check below can fail
        assert all(q.params is not None and q.params.exact for q in qdrant.queries)


async def test_quantized_widths_keep_int8_in_ram_and_rescore_graph_searches() -> None:
    qdrant = RecordingQdrant()
    store = QdrantServerStore(qdrant, "q", quantize_from=8)  # type: ignore[arg-type]
    await store.open([4, 8])
    try:
        for width, quantized in ((4, False), (8, True)):
            vectors = (await qdrant.get_collection(f"q_d{width}")).config.params.vectors
            assert isinstance(vectors, models.VectorParams)
            assert bool(vectors.on_disk) is quantized
            if quantized:
                assert isinstance(vectors.quantization_config, models.ScalarQuantization)
                assert vectors.quantization_config.scalar.type == models.ScalarType.INT8
                assert vectors.quantization_config.scalar.always_ram
            else:
                assert vectors.quantization_config is None
            await store.query(width, "c", np.eye(1, width, dtype=np.float32), K)
            (sent,) = qdrant.queries[-1:]
            assert sent.params is not None
            # Qdrant ignores quantized vectors in an exact search: quantized widths use the graph.
            assert bool(sent.params.exact) is not quantized
            rescored = sent.params.quantization is not None and sent.params.quantization.rescore
            assert rescored is quantized
    finally:
        await store.close()
