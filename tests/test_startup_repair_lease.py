"""Start-up repair on a store other replicas share: it completes a classifier under its write lease.

Replica B starts (and repairs) while replica A deletes exemplars or the classifier, on one Qdrant
store (local mode, one client, a store object per replica, as in test_leases). The races are
made deterministic by the gates of ``GatedStore``: a replica's write or delete of one dimension
waits until the test lets it go on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.server.domain import ExemplarInput, NewClassifier
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import Record, Selection
from knn_classifier.server.store.base import Matrix
from knn_classifier.server.store.qdrant_server import QdrantServerStore

from .conftest import make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_integrity import open_replica
from .test_leases import GatedStore, contents, until_done_or_set


class DeleteGatedStore(GatedStore):
    """``GatedStore`` whose deletes from dimension ``before`` wait too while ``hold`` is clear."""

    async def delete(self, dimension: int, selection: Selection) -> None:
        if dimension == self.before:
            await self._gate()
        await super().delete(dimension, selection)


class RetrieveGatedStore(GatedStore):
    """``GatedStore`` whose reads of points by id (the repair's source points) wait, once read,
    while ``hold`` is clear."""

    async def retrieve(self, dimension: int, ids: Sequence[str]) -> tuple[list[Record], Matrix]:
        found = await super().retrieve(dimension, ids)
        await self._gate()
        return found


async def replica_with_a_half_deleted_exemplar(
    settings: Settings, store: QdrantServerStore
) -> ClassifierService:
    """Replica A with classifier "c" whose one exemplar "half" is missing from the first
    dimension, as a replica crashing between two dimensions of its delete leaves it."""
    replica = await open_replica(settings, store)
    await replica.create_classifier(NewClassifier("c"))
    await replica.add_exemplars("c", [ExemplarInput("half words", "a", id="half")])
    first = settings.dimensions[0]
    records, _ = await store.vectors(first, "c")
    point = next(r.id for r in records if r.payload["id"] == "half")
    await store.delete(first, Selection("c", ids=[point]))
    return replica


async def test_a_replica_starting_during_a_delete_on_another_does_not_write_back_what_it_removed(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """A's DeleteExemplars has removed "gone" from the first dimension, not yet from the last,
    when B starts. Without the lease B's repair saw "gone" missing from the first dimension and
    wrote it back there; A's delete then removed it from the last only, leaving it in the first
    for good. Now B waits for A's lease and reads what is missing after A's delete: nothing."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    first, last = settings.dimensions[0], settings.dimensions[-1]
    client = AsyncQdrantClient(":memory:")
    store_a = DeleteGatedStore(client, before=last)
    replica_a = await open_replica(settings, store_a)
    await replica_a.create_classifier(NewClassifier("c"))
    await replica_a.add_exemplars(
        "c",
        [ExemplarInput("kept words", "a", id="kept"), ExemplarInput("gone words", "a", id="gone")],
    )
    store_a.hold.clear()
    deleting = asyncio.create_task(replica_a.delete_exemplars("c", ids=["gone"]))
    await store_a.holding.wait()  # removed from the first dimension, not yet from the last
    store_b = GatedStore(client)
    starting = asyncio.create_task(open_replica(settings, store_b))
    await until_done_or_set(starting, store_b.saw_lease_held)
    store_a.hold.set()
    _, deleted_etag = await deleting
    replica_b = await starting
    assert await contents(store_b, settings) == {first: {"kept"}, last: {"kept"}}
    assert (await replica_b.get_classifier("c")).config.etag == deleted_etag  # nothing written
    await replica_a.stop()
    await replica_b.stop()


async def test_a_classifier_deleted_on_another_replica_during_the_repair_keeps_no_point(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """B's repair is about to write "half" (left in the last dimension only) back into the first
    when A deletes the classifier (DeleteClassifier takes no lease). Without a check after the
    write, the point stayed in the first dimension with no record, and the next start-up of
    any replica refused to start on it; now B finds the record gone and removes what it wrote."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    first = settings.dimensions[0]
    client = AsyncQdrantClient(":memory:")
    store_a = QdrantServerStore(client, "knn")
    replica_a = await replica_with_a_half_deleted_exemplar(settings, store_a)
    store_b = GatedStore(client, before=first)
    store_b.hold.clear()
    starting = asyncio.create_task(open_replica(settings, store_b))
    await store_b.holding.wait()  # B's repair read "half" and is about to write it
    await replica_a.delete_classifier("c")
    store_b.hold.set()
    replica_b = await starting
    for dimension in settings.dimensions:
        assert await store_a.count(dimension, Selection("c")) == 0
    replica_c = await open_replica(settings, QdrantServerStore(client, "knn"))  # no orphans
    for replica in (replica_a, replica_b, replica_c):
        await replica.stop()


async def test_a_classifier_whose_lease_stays_held_is_skipped_then_completed_at_the_next_start(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Another replica holds the lease longer than a starting replica waits for it (twice its
    lease): start-up skips that classifier with a warning instead of hanging, writes nothing
    into it, and the next start after the lease is released completes it, moving its etag."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    impatient = make_settings(tmp_path, fake_embedder.base_url, store={"write_lease_s": 0.1})
    first, last = settings.dimensions[0], settings.dimensions[-1]
    client = AsyncQdrantClient(":memory:")
    store = QdrantServerStore(client, "knn")
    replica_a = await replica_with_a_half_deleted_exemplar(settings, store)
    before = (await replica_a.get_classifier("c")).config.etag
    held = {"lease": "another-replica", "lease_until": time.time() + 600}
    await store.update_meta("classifier:c", held, {})

    with caplog.at_level(logging.WARNING, "knn_classifier.server.startup_repair"):
        replica_b = await open_replica(impatient, QdrantServerStore(client, "knn"))
    assert "start-up repair skipped classifier c" in caplog.text
    assert await contents(store, settings) == {first: set(), last: {"half"}}
    assert (await replica_a.get_classifier("c")).config.etag == before

    await store.update_meta("classifier:c", {"lease_until": 0}, {"lease": "another-replica"})
    replica_c = await open_replica(settings, QdrantServerStore(client, "knn"))
    assert await contents(store, settings) == {first: {"half"}, last: {"half"}}
    assert (await replica_a.get_classifier("c")).config.etag != before
    record = await store.get_meta("classifier:c")
    assert record is not None
    assert record["lease"] != "another-replica"
    assert record["lease_until"] == 0  # released by the repair's revision bump
    for replica in (replica_a, replica_b, replica_c):
        await replica.stop()


async def test_a_repair_that_lost_its_lease_while_stalled_reads_what_is_missing_again(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """B's repair (lease of 0.3 s) has read "half" (left in the last dimension only) to write it
    into the first, and stalls. Its lease runs out; A takes it and deletes "half". B checks its
    lease before its store write, finds it taken, and does the repair again under a new lease:
    "half" is gone everywhere, nothing is written. Written on the lost lease, "half" would have
    come back in the first dimension, and the repair done again would have copied it into the
    last one as well."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    settings_b = make_settings(tmp_path, fake_embedder.base_url, store={"write_lease_s": 0.3})
    first, last = settings.dimensions[0], settings.dimensions[-1]
    client = AsyncQdrantClient(":memory:")
    store_a = QdrantServerStore(client, "knn")
    replica_a = await replica_with_a_half_deleted_exemplar(settings, store_a)
    store_b = RetrieveGatedStore(client)
    store_b.hold.clear()
    starting = asyncio.create_task(open_replica(settings_b, store_b))
    await store_b.holding.wait()  # B read "half" from the last dimension, under its lease
    await replica_a.delete_exemplars("c", ids=["half"])  # once B's lease has run out
    store_b.hold.set()
    replica_b = await starting
    assert await contents(store_a, settings) == {first: set(), last: set()}
    await replica_a.stop()
    await replica_b.stop()
