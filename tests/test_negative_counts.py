"""ListLabels counts negatives by their stored flag, and the embedded store indexes the flag.

ListLabels used to filter the label counts by the flag only for a classifier whose record was
marked ``holds_negatives`` when it read it: a negative stored after that read was counted in its
topic label.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import qdrant_edge as qe

from knn_classifier.server.domain import ExemplarInput, NewClassifier
from knn_classifier.server.store import EdgeStore
from knn_classifier.server.store.schema import OUT_OF_SCOPE

from .conftest import make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_integrity import open_replica


class PausingLabelCounts(EdgeStore):
    """The embedded store, pausing before it counts labels while ``hold`` is clear."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    async def label_counts(
        self, dimension: int, classifier: str, out_of_scope: bool | None = None
    ) -> dict[str, int]:
        if not self.hold.is_set():
            self.holding.set()
            await self.hold.wait()
        return await super().label_counts(dimension, classifier, out_of_scope)


async def test_a_negative_stored_while_list_labels_runs_is_in_no_label(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """ListLabels reads the record before the classifier's first negative is marked, and counts
    labels after the negative is stored: the negative's topic is no label."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = PausingLabelCounts(settings.data_dir)
    service = await open_replica(settings, store)
    try:
        await service.create_classifier(NewClassifier("c"))
        await service.add_exemplars("c", [ExemplarInput("alpha beta", "a")])
        store.hold.clear()
        listing = asyncio.create_task(service.list_labels("c"))
        await store.holding.wait()
        await service.add_exemplars(
            "c", [ExemplarInput("storm wind", "weather", out_of_scope=True)]
        )
        assert (await service.get_classifier("c")).config.holds_negatives
        store.hold.set()
        labels, _, _, _ = await listing
        assert labels == [("a", 1)]
        assert (await service.list_labels("c"))[:3] == ([("a", 1)], "", 1)
    finally:
        store.hold.set()
        await service.stop()


def shard_schema(data_dir: Path, dimension: int) -> set[str]:
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dimension, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.load(str(data_dir / "edge" / f"d{dimension}"), config)
    try:
        return set(shard.info().payload_schema)
    finally:
        shard.close()


async def test_the_embedded_store_indexes_the_flag_in_new_and_older_shards(
    tmp_path: Path,
) -> None:
    store = EdgeStore(tmp_path)
    await store.open([8])
    await store.close()
    assert shard_schema(tmp_path, 8) == {"classifier", "label", OUT_OF_SCOPE}

    # A shard as a version before negative exemplars left it: opened, it gets the index.
    config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=8, distance=qe.Distance.Cosine))
    shard = qe.EdgeShard.load(str(tmp_path / "edge" / "d8"), config)
    shard.update(qe.UpdateOperation.delete_field_index(OUT_OF_SCOPE))
    shard.close()
    assert OUT_OF_SCOPE not in shard_schema(tmp_path, 8)
    store = EdgeStore(tmp_path)
    await store.open([8])
    await store.close()
    assert OUT_OF_SCOPE in shard_schema(tmp_path, 8)
