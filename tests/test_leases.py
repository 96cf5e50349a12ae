"""The cross-replica write lease: two service replicas writing one classifier on one Qdrant store.

Each replica has its own store object over one shared Qdrant client (local mode), as replicas
share one Qdrant server. Races are made deterministic by a gate in a replica's store that holds
its write of one dimension until the test lets it go on; a lease left by a crashed replica is
written into the record as that replica would have left it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.server import deadlines, statuses
from knn_classifier.server.domain import ExemplarInput, NewClassifier
from knn_classifier.server.errors import Aborted, Reason, ResourceExhausted
from knn_classifier.server.leases import LeaseLost, Leases
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import EdgeStore
from knn_classifier.server.store.base import Matrix, Payload
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.server.store.schema import ExemplarPayload

from .conftest import make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_integrity import open_replica


class GatedStore(QdrantServerStore):
    """The Qdrant server store on a shared client. While ``hold`` is clear, a write of the
    points of dimension ``before`` waits before it reaches Qdrant, and one of ``after`` waits
    once Qdrant has applied it. ``saw_lease_held`` is set when this replica reads a classifier
    record whose lease is held (by another replica, when it has not taken it itself)."""

    def __init__(
        self, client: AsyncQdrantClient, *, before: int | None = None, after: int | None = None
    ) -> None:
        super().__init__(client, "knn")
        self.before, self.after = before, after
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()
        self.saw_lease_held = asyncio.Event()

    async def _gate(self) -> None:
        if not self.hold.is_set():
            self.holding.set()
            await self.hold.wait()

    async def upsert(
        self,
        dimension: int,
        ids: Sequence[str],
        vectors: Matrix,
        payloads: Sequence[ExemplarPayload],
    ) -> None:
        if dimension == self.before:
            await self._gate()
        await super().upsert(dimension, ids, vectors, payloads)
        if dimension == self.after:
            await self._gate()

    async def get_meta(self, key: str) -> Payload | None:
        record = await super().get_meta(key)
        if record is not None and record.get("lease_until", 0) > time.time():
            self.saw_lease_held.set()
        return record


async def two_replicas(
    settings: Settings, store_a: GatedStore, settings_b: Settings | None = None
) -> tuple[ClassifierService, ClassifierService, GatedStore]:
    """Replica A on ``store_a``, replica B on a store of its own over the same client."""
    store_b = GatedStore(store_a._client)
    replica_a = await open_replica(settings, store_a)
    replica_b = await open_replica(settings_b or settings, store_b)
    return replica_a, replica_b, store_b


async def until_done_or_set(task: asyncio.Task[Any], event: asyncio.Event) -> None:
    """Waits until ``task`` has finished or ``event`` is set, whichever comes first."""
    setting = asyncio.create_task(event.wait())
    await asyncio.wait({task, setting}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    setting.cancel()
    assert task.done() or event.is_set()


async def contents(store: QdrantServerStore, settings: Settings) -> dict[int, set[str]]:
    """The exemplar ids of classifier "c" in each dimension's collection."""
    found = {}
    for dimension in settings.dimensions:
        records, _ = await store.vectors(dimension, "c")
        found[dimension] = {r.payload["id"] for r in records}
    return found


@pytest.mark.parametrize("selector", ["ids", "label"])
async def test_a_delete_on_one_replica_during_an_add_on_another_leaves_every_dimension_equal(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, selector: str
) -> None:
    """Replica A's AddExemplars has written the first dimension and not the last when replica B
    deletes by ids or by label. Before the lease, B's delete ran between A's two writes: the
    acknowledged exemplar stayed in the last dimension only. Now B waits for A's lease, and the
    delete comes after the add, in every dimension."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store_a = GatedStore(AsyncQdrantClient(":memory:"), before=settings.dimensions[-1])
    replica_a, replica_b, store_b = await two_replicas(settings, store_a)
    await replica_a.create_classifier(NewClassifier("c"))
    await replica_a.add_exemplars("c", [ExemplarInput("old words", "a", id="old")])
    store_a.hold.clear()
    adding = asyncio.create_task(
        replica_a.add_exemplars("c", [ExemplarInput("new words", "a", id="new")])
    )
    await store_a.holding.wait()  # the first dimension written, the last not yet
    if selector == "ids":
        deleting = asyncio.create_task(replica_b.delete_exemplars("c", ids=["old", "new"]))
    else:
        deleting = asyncio.create_task(replica_b.delete_exemplars("c", label="a"))
    await until_done_or_set(deleting, store_b.saw_lease_held)
    store_a.hold.set()
    await adding
    deleted, _ = await deleting
    assert deleted == 2
    assert await contents(store_b, settings) == {16: set(), 64: set()}
    await replica_a.stop()
    await replica_b.stop()


async def test_concurrent_adds_on_two_replicas_never_pass_the_exemplar_limit(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """A's add has passed its limit check and not written yet when B's add checks: without the
    lease both passed and the classifier held 12 of 10; now B checks after A's write."""
    settings = make_settings(
        tmp_path, fake_embedder.base_url, limits={"max_exemplars_per_classifier": 10}
    )
    store_a = GatedStore(AsyncQdrantClient(":memory:"), before=settings.dimensions[0])
    replica_a, replica_b, store_b = await two_replicas(settings, store_a)
    await replica_a.create_classifier(NewClassifier("c"))
    store_a.hold.clear()
    batch_a = [ExemplarInput(f"text a {i}", "x") for i in range(6)]
    batch_b = [ExemplarInput(f"text b {i}", "x") for i in range(6)]
    adding_a = asyncio.create_task(replica_a.add_exemplars("c", batch_a))
    await store_a.holding.wait()
    adding_b = asyncio.create_task(replica_b.add_exemplars("c", batch_b))
    await until_done_or_set(adding_b, store_b.saw_lease_held)
    store_a.hold.set()
    assert len((await adding_a)[0]) == 6
    with pytest.raises(ResourceExhausted):
        await adding_b
    assert [len(ids) for ids in (await contents(store_b, settings)).values()] == [6, 6]
    await replica_a.stop()
    await replica_b.stop()


async def test_a_replica_stalled_in_a_write_makes_the_other_wait_then_answer_busy(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """B waits for the lease of A, stalled between two dimensions, until B's deadline; then
    answers ABORTED (CLASSIFIER_BUSY, RetryInfo) having written nothing. B's retry once A is
    done succeeds."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store_a = GatedStore(AsyncQdrantClient(":memory:"), before=settings.dimensions[-1])
    replica_a, replica_b, store_b = await two_replicas(settings, store_a)
    await replica_a.create_classifier(NewClassifier("c"))
    await replica_a.add_exemplars("c", [ExemplarInput("old words", "a", id="old")])
    before = (await replica_b.get_classifier("c")).config.etag
    store_a.hold.clear()
    adding = asyncio.create_task(
        replica_a.add_exemplars("c", [ExemplarInput("new words", "a", id="new")])
    )
    await store_a.holding.wait()
    with deadlines.within(0.2), pytest.raises(Aborted) as refused:
        await replica_b.delete_exemplars("c", ids=["old"])
    assert store_b.saw_lease_held.is_set()
    assert_busy(refused.value)
    assert (await replica_b.get_classifier("c")).config.etag == before
    store_a.hold.set()
    await adding
    assert (await replica_b.delete_exemplars("c", ids=["old"]))[0] == 1
    assert await contents(store_b, settings) == {16: {"new"}, 64: {"new"}}
    await replica_a.stop()
    await replica_b.stop()


def assert_busy(error: Aborted) -> None:
    details = statuses.of_error(error)
    assert details.code == grpc.StatusCode.ABORTED.value[0]
    assert error.reason is Reason.CLASSIFIER_BUSY
    assert error.retry_after_s is not None
    assert error.retry_after_s > 0
    assert [d.type_url.rsplit(".", 1)[-1] for d in details.details] == [
        "ErrorInfo",
        "ResourceInfo",
        "RetryInfo",
    ]


async def test_a_lease_left_by_a_crashed_replica_is_waited_for_until_it_expires(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """A replica crashed holding the lease (its token and expiry stay in the record). A write
    waits for it at most until the expiry, then takes the lease and proceeds; with a deadline
    before the expiry, or a lease this replica would not wait for, it answers busy."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    client = AsyncQdrantClient(":memory:")
    store = QdrantServerStore(client, "knn")
    replica = await open_replica(settings, store)
    await replica.create_classifier(NewClassifier("c"))

    async def crashed_holding(seconds: float) -> None:
        taken = {"lease": "crashed-replica", "lease_until": time.time() + seconds}
        await store.update_meta("classifier:c", taken, {})

    await crashed_holding(600)
    with deadlines.within(0.2), pytest.raises(Aborted) as refused:
        await replica.add_exemplars("c", [ExemplarInput("some words", "a")])
    assert_busy(refused.value)
    impatient = await open_replica(
        make_settings(tmp_path, fake_embedder.base_url, store={"write_lease_s": 0.1}),
        QdrantServerStore(client, "knn"),
    )
    with pytest.raises(Aborted) as refused:  # waits at most twice its own lease: 0.2 s
        await impatient.add_exemplars("c", [ExemplarInput("some words", "a")])
    assert_busy(refused.value)
    assert (await replica.get_classifier("c")).exemplar_count == 0

    await crashed_holding(0.3)
    await replica.add_exemplars("c", [ExemplarInput("some words", "a")])
    record = await store.get_meta("classifier:c")
    assert record is not None
    assert record["lease"] != "crashed-replica"
    assert record["lease_until"] == 0  # released by the write's revision bump
    assert (await replica.get_classifier("c")).exemplar_count == 1
    await replica.stop()
    await impatient.stop()


@pytest.mark.parametrize("stalled", ["inside the last write", "between two writes"])
async def test_a_replica_that_lost_its_lease_mid_write_does_the_write_again_everywhere(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, stalled: str
) -> None:
    """A (lease of 0.3 s) stalls in its AddExemplars after writing the first dimension: inside
    its write of the last one (the write lands late; A's final compare-and-set finds the lease
    taken) or before starting it (A's own clock tells it the lease ran out). Meanwhile B takes
    the expired lease and deletes by label, which removes A's point from the first dimension.
    A must not acknowledge its add as it is: it writes it again, under a new lease, in every
    dimension, and the add is acknowledged after B's delete."""
    settings_a = make_settings(tmp_path, fake_embedder.base_url, store={"write_lease_s": 0.3})
    settings_b = make_settings(tmp_path, fake_embedder.base_url)
    first, last = settings_a.dimensions[0], settings_a.dimensions[-1]
    client = AsyncQdrantClient(":memory:")
    if stalled == "inside the last write":
        store_a = GatedStore(client, before=last)
    else:
        store_a = GatedStore(client, after=first)
    replica_a, replica_b, store_b = await two_replicas(settings_a, store_a, settings_b)
    await replica_a.create_classifier(NewClassifier("c"))
    store_a.hold.clear()
    adding = asyncio.create_task(
        replica_a.add_exemplars("c", [ExemplarInput("new words", "a", id="new")])
    )
    await store_a.holding.wait()
    deleted, deleted_etag = await replica_b.delete_exemplars("c", label="a")
    assert deleted == 1  # A's point, in the first dimension
    store_a.hold.set()
    _, added_etag = await adding
    assert await contents(store_b, settings_a) == {first: {"new"}, last: {"new"}}
    current = (await replica_b.get_classifier("c")).config
    assert current.etag == added_etag != deleted_etag
    assert current.revision > int(deleted_etag.split(".")[1])
    await replica_a.stop()
    await replica_b.stop()


async def test_a_lease_half_gone_is_extended_under_a_new_token_before_a_store_write(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """A write lasting longer than half its lease extends it before its next store write, under
    a new token: a replica that saw the old token expiring cannot take the lease on it. A lease
    run out but not taken is extended as well; one another replica took is lost."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = QdrantServerStore(AsyncQdrantClient(":memory:"), "knn")
    replica = await open_replica(settings, store)
    await replica.create_classifier(NewClassifier("c"))
    leases = Leases(store, 600)
    lease = await leases.take((await replica.get_classifier("c")).config)

    async def record() -> Payload:
        payload = await store.get_meta("classifier:c")
        assert payload is not None
        return payload

    async def taken_by_another(seen_token: str) -> None:
        taken = {"lease": "another-replica", "lease_until": time.time() + 600}
        await store.update_meta("classifier:c", taken, {"lease": seen_token})

    untouched = lease.token
    await leases.renewed(lease)  # all of it left: nothing to do
    assert lease.token == untouched
    lease.expires = time.monotonic() + 1  # as if 599 s of its 600 were gone
    await leases.renewed(lease)
    assert (await record())["lease"] == lease.token != untouched
    assert (await record())["lease_until"] > time.time() + 500
    await taken_by_another(untouched)  # it saw the old token about to expire: too late
    assert (await record())["lease"] == lease.token

    lease.expires = time.monotonic() - 1  # run out, but nobody took it
    await leases.renewed(lease)
    assert (await record())["lease"] == lease.token
    await taken_by_another(lease.token)
    lease.expires = time.monotonic() - 1
    with pytest.raises(LeaseLost):
        await leases.renewed(lease)
    await replica.stop()


async def test_the_embedded_store_takes_no_lease(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """One process only opens the embedded store (its directory lock): its writes cost no lease
    round trip and leave no lease in the record."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = EdgeStore(settings.data_dir)
    replica = await open_replica(settings, store)
    await replica.create_classifier(NewClassifier("c"))
    await replica.add_exemplars("c", [ExemplarInput("some words", "a")])
    await replica.delete_exemplars("c", label="a")
    record = await store.get_meta("classifier:c")
    assert record is not None
    assert "lease" not in record
    await replica.stop()
