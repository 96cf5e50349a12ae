"""Integrity when calls race each other: one writer per classifier, no orphans, no resurrection.

Each race is made deterministic: the fake embedder holds its calls at a gate, or the store pauses
after a query, until the competing call has finished.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.client import (
    AbortedError,
    Client,
    FailedPreconditionError,
    KnnClassifierError,
    NotFoundError,
    ResourceExhaustedError,
)
from knn_classifier.server import deadlines
from knn_classifier.server.app import build_embedding
from knn_classifier.server.domain import ClassifierUpdate, ExemplarInput, NewClassifier
from knn_classifier.server.errors import NotFound
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import EdgeStore, Record, Selection, Store
from knn_classifier.server.store.base import Matrix, Payload
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.server.store.schema import ExemplarPayload
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_crash import points_by_dimension

T = TypeVar("T")


def in_background(call: Callable[[], T]) -> Any:
    """Runs ``call`` in a thread; returns its future."""
    return ThreadPoolExecutor(max_workers=1).submit(call)


def test_add_racing_a_delete_writes_nothing_and_a_recreated_classifier_starts_empty(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        gate = fake_embedder.hold()
        adding = in_background(lambda: client.add_exemplars("c", [("late words", "a")]))
        fake_embedder.wait_for_held(1)
        client.delete_classifier("c")
        client.create_classifier("c")
        gate.set()
        with pytest.raises(NotFoundError):
            adding.result(timeout=60)
        assert client.get_classifier("c").exemplar_count == 0
    running.stop()
    assert points_by_dimension(tmp_path, "c") == {16: {}, 64: {}}
    running = ServerThread(settings).start()
    with running.client() as client:
        assert client.get_classifier("c").exemplar_count == 0
    running.stop()


def test_concurrent_adds_never_pass_the_exemplar_limit(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(
        tmp_path, fake_embedder.base_url, limits={"max_exemplars_per_classifier": 10}
    )
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        gate = fake_embedder.hold()
        batches = [[(f"text {b} {i}", f"l{i % 2}") for i in range(5)] for b in range(6)]
        with ThreadPoolExecutor(max_workers=6) as pool:
            adds = [pool.submit(client.add_exemplars, "c", batch) for batch in batches]
            fake_embedder.wait_for_held(6)  # every add has passed its checks before embedding
            gate.set()
            outcomes = []
            for add in adds:
                try:
                    outcomes.append(len(add.result(timeout=60)))
                except ResourceExhaustedError:
                    outcomes.append(0)
        assert sorted(outcomes) == [0, 0, 0, 0, 5, 5]
        assert client.get_classifier("c").exemplar_count == 10
    running.stop()
    assert [len(points) for points in points_by_dimension(tmp_path, "c").values()] == [10, 10]


class PausingStore(EdgeStore):
    """The embedded store, pausing after each query until a test lets it go on."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.paused = threading.Event()
        self.resume = threading.Event()

    async def query(
        self,
        dimension: int,
        classifier: str,
        vectors: Matrix,
        k: int,
        out_of_scope: bool | None = None,
    ) -> list[list[Record]]:
        hits = await super().query(dimension, classifier, vectors, k, out_of_scope)
        self.paused.set()
        await asyncio.to_thread(self.resume.wait, 60)
        return hits


@pytest.mark.parametrize("voting", ["centroid", "discriminant"])
def test_classify_with_a_label_model_while_every_exemplar_is_deleted(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, voting: str
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = PausingStore(settings.data_dir)
    store.resume.set()
    running = ServerThread(settings, store).start()
    with running.client() as client:
        client.create_classifier("c", voting=voting)
        client.add_exemplars("c", [("red apple", "fruit"), ("green pear", "fruit")])
        store.resume.clear()
        classifying = in_background(lambda: client.classify("c", "apple"))
        assert store.paused.wait(60)
        client.delete_exemplars("c", label="fruit")
        store.resume.set()
        with pytest.raises(FailedPreconditionError):
            classifying.result(timeout=60)
    running.stop()


def test_records_and_derived_ids_of_a_recreated_classifier_are_new(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", [("one text", "a")])
        client.delete_classifier("c")
        client.create_classifier("c")
        client.add_exemplars("c", [("one text", "b")])
        assert [e.label for e in client.list_exemplars("c").exemplars] == ["b"]
    running.stop()


def test_start_up_finishes_an_interrupted_classifier_delete(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("gone")
        client.add_exemplars("gone", [("some words", "a"), ("other words", "b")])
        client.create_classifier("kept")
        client.add_exemplars("kept", [("kept words", "a")])
    running.stop()

    async def interrupt_delete() -> None:
        """What a crash right after the record was marked ``deleting`` leaves behind."""
        store = EdgeStore(settings.data_dir)
        await store.open(settings.dimensions)
        payload = await store.get_meta("classifier:gone")
        assert payload is not None
        await store.put_meta("classifier:gone", {**payload, "deleting": True})
        await store.delete(16, Selection("gone"))
        await store.close()

    asyncio.run(interrupt_delete())
    running = ServerThread(settings).start()
    with running.client() as client:
        assert [c.name for c in client.list_classifiers()] == ["kept"]
        with pytest.raises(NotFoundError):
            client.get_classifier("gone")
        client.create_classifier("gone")
        assert client.get_classifier("gone").exemplar_count == 0
    running.stop()
    assert points_by_dimension(tmp_path, "gone") == {16: {}, 64: {}}


def test_labels_with_surrounding_whitespace_are_refused(client: Client) -> None:
    client.create_classifier("c")
    for label in ("fruit ", " fruit", "fru\nit"):
        with pytest.raises(KnnClassifierError) as refused:
            client.add_exemplars("c", [("apple", label)])
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert client.get_classifier("c").exemplar_count == 0


# Across replicas: two services sharing one Qdrant store, no shared lock -------------------------


class PausingQdrantStore(QdrantServerStore):
    """The Qdrant server store (local mode), pausing before upserts while ``hold`` is clear."""

    def __init__(self) -> None:
        super().__init__(AsyncQdrantClient(":memory:"), "knn")
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    async def upsert(
        self,
        dimension: int,
        ids: Sequence[str],
        vectors: Matrix,
        payloads: Sequence[ExemplarPayload],
    ) -> None:
        if not self.hold.is_set():
            self.holding.set()
            await self.hold.wait()
        await super().upsert(dimension, ids, vectors, payloads)


async def open_replica(settings: Settings, store: Store) -> ClassifierService:
    service = ClassifierService(settings, build_embedding(settings), store)
    await service.start()
    return service


@pytest.mark.parametrize("race_at", ["embedding", "writing"])
async def test_a_replica_removes_what_it_wrote_when_another_deleted_the_classifier(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, race_at: str
) -> None:
    """Replica A adds while replica B deletes and re-creates the classifier: during A's
    embedding call (A's check under its lock catches it) or during A's write (A's re-check
    after writing catches it and removes its points)."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = PausingQdrantStore()
    replica_a = await open_replica(settings, store)
    replica_b = await open_replica(settings, store)
    await replica_a.create_classifier(NewClassifier("c"))
    if race_at == "embedding":
        gate = fake_embedder.hold()
    else:
        store.hold.clear()
    adding = asyncio.create_task(replica_a.add_exemplars("c", [ExemplarInput("late words", "a")]))
    if race_at == "embedding":
        await asyncio.to_thread(fake_embedder.wait_for_held, 1)
    else:
        await store.holding.wait()
    await replica_b.delete_classifier("c")
    await replica_b.create_classifier(NewClassifier("c"))
    if race_at == "embedding":
        gate.set()
    else:
        store.hold.set()
    with pytest.raises(NotFound):
        await adding
    for dimension in settings.dimensions:
        assert await store.count(dimension, Selection("c")) == 0
    assert (await replica_b.get_classifier("c")).exemplar_count == 0
    await replica_a.stop()
    await replica_b.stop()


def test_delete_exemplars_refuses_more_ids_than_a_batch(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """300,000 ids held the event loop for 3 s; ids per call are bounded like texts per call."""
    settings = make_settings(tmp_path, fake_embedder.base_url, limits={"max_batch_size": 100})
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", [("kept words", "a")])
        with pytest.raises(KnnClassifierError) as refused:
            client.delete_exemplars("c", ids=[f"id{i}" for i in range(101)])
        assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert "100" in refused.value.details
        assert client.delete_exemplars("c", ids=[f"id{i}" for i in range(100)]) == 0
        assert client.get_classifier("c").exemplar_count == 1
    running.stop()


class PausedEvaluator:
    """The service's evaluator, pausing after its sweep until the test lets it go on."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.swept = threading.Event()
        self.go_on = threading.Event()

    async def evaluate(self, config: Any, request: Any) -> Any:
        evaluation = await self.inner.evaluate(config, request)
        self.swept.set()
        await asyncio.to_thread(self.go_on.wait, 60)
        return evaluation


@pytest.mark.parametrize("meanwhile", ["delete", "add"])
def test_apply_best_never_overwrites_a_classifier_changed_during_the_sweep(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, meanwhile: str
) -> None:
    """Deleted during the sweep: Evaluate answers NOT_FOUND and the classifier stays deleted.
    Given an exemplar during the sweep: ABORTED, and the settings stay as they were."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()
    assert running.app is not None
    paused = PausedEvaluator(running.app.service._evaluator)
    running.app.service._evaluator = paused  # type: ignore[assignment]
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars(
            "c", [(f"{w} fruit {i}", "fruit") for i, w in enumerate(["apple", "pear", "fig"])]
        )
        client.add_exemplars(
            "c", [(f"{w} car {i}", "car") for i, w in enumerate(["red", "fast", "old"])]
        )
        before = client.get_classifier("c")
        evaluating = in_background(
            lambda: client.evaluate("c", k=[1, 3], apply_best=True, target_precision=0.9)
        )
        assert paused.swept.wait(60)
        if meanwhile == "delete":
            client.delete_classifier("c")
        else:
            client.add_exemplars("c", [("plum fruit", "fruit")])
        paused.go_on.set()
        with pytest.raises(KnnClassifierError) as refused:
            evaluating.result(timeout=60)
        if meanwhile == "delete":
            assert refused.value.code is grpc.StatusCode.NOT_FOUND
            assert client.list_classifiers() == []
        else:
            assert refused.value.code is grpc.StatusCode.ABORTED
            after = client.get_classifier("c")
            assert not after.calibrated
            assert (after.k, after.min_similarity) == (before.k, before.min_similarity)
    running.stop()


def test_etags_change_with_every_write_and_make_writes_conditional(
    server: ServerThread, client: Client
) -> None:
    created = client.create_classifier("c")
    assert created.etag
    client.add_exemplars("c", [("red apple", "fruit")], etag=created.etag)
    added = client.get_classifier("c")
    assert added.etag != created.etag
    for stale_write in (
        lambda: client.add_exemplars("c", [("green pear", "fruit")], etag=created.etag),
        lambda: client.delete_exemplars("c", label="fruit", etag=created.etag),
        lambda: client.update_classifier("c", k=3, etag=created.etag),
        lambda: client.evaluate("c", apply_best=True, etag=created.etag),
        lambda: client.delete_classifier("c", etag=created.etag),
    ):
        with pytest.raises(AbortedError) as refused:
            stale_write()
        assert refused.value.reason == "ETAG_MISMATCH"
    assert client.get_classifier("c").etag == added.etag  # no stale write changed anything
    updated = client.update_classifier("c", k=3, etag=added.etag)
    assert updated.etag != added.etag
    stub = pb_grpc.ClassifierServiceStub(server.channel())
    answered = stub.Classify(pb.ClassifyRequest(classifier="c", text="apple"))
    assert answered.etag == updated.etag
    batch = stub.ClassifyBatch(pb.ClassifyBatchRequest(classifier="c", texts=["apple", ""]))
    assert batch.etag == updated.etag
    assert client.classify_batch("c", ["apple", ""]).etag == updated.etag
    removed = stub.DeleteExemplars(
        pb.DeleteExemplarsRequest(classifier="c", label="fruit", etag=updated.etag)
    )
    assert (removed.deleted, removed.etag) == (1, client.get_classifier("c").etag)
    client.delete_classifier("c", etag=removed.etag)
    assert client.list_classifiers() == []


def test_a_delete_of_nothing_keeps_the_etag_and_empty_ids_are_refused(client: Client) -> None:
    client.create_classifier("c")
    client.add_exemplars("c", [("red apple", "fruit")])
    etag = client.get_classifier("c").etag
    assert client.delete_exemplars("c", ids=["no-such-id"], etag=etag) == 0
    assert client.delete_exemplars("c", label="no-such-label", etag=etag) == 0
    assert client.get_classifier("c").etag == etag
    with pytest.raises(KnnClassifierError) as refused:
        client.delete_exemplars("c", ids=[""])
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT


async def test_a_write_cancelled_between_dimensions_still_reaches_every_dimension(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """The caller's deadline passes while the write is between two dimensions (the Qdrant
    server store suspends there): the write finishes in both, and the revision moves."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = PausingQdrantStore()
    service = await open_replica(settings, store)
    await service.create_classifier(NewClassifier("c"))
    before = (await service.get_classifier("c")).config.etag
    store.hold.clear()
    adding = asyncio.create_task(service.add_exemplars("c", [ExemplarInput("some words", "a")]))
    await store.holding.wait()
    adding.cancel()
    store.hold.set()
    with pytest.raises(asyncio.CancelledError):
        await adding
    for dimension in settings.dimensions:
        for _ in range(600):
            if await store.count(dimension, Selection("c")) == 1:
                break
            await asyncio.sleep(0.05)
        assert await store.count(dimension, Selection("c")) == 1
    for _ in range(600):
        if (await service.get_classifier("c")).config.etag != before:
            break
        await asyncio.sleep(0.05)
    assert (await service.get_classifier("c")).config.etag != before
    await service.stop()


def test_the_classifiers_own_temperature_sent_back_keeps_its_calibration(
    client: Client,
) -> None:
    """Temperatures travel as float32: sending the classifier's own back is its own setting."""
    client.create_classifier("c", voting="softmax", temperature=0.05)
    client.add_exemplars(
        "c", [(f"{w} fruit {i}", "fruit") for i, w in enumerate(["apple", "pear", "fig", "plum"])]
    )
    client.add_exemplars(
        "c", [(f"{w} car {i}", "car") for i, w in enumerate(["red", "fast", "old", "blue"])]
    )
    client.evaluate("c", apply_best=True)
    own = client.get_classifier("c")
    assert own.calibrated
    default = client.classify("c", "apple fruit")
    explicit = client.classify(
        "c", "apple fruit", k=own.k, voting="softmax", temperature=own.temperature
    )
    assert explicit.confidence == default.confidence


class PausingRecordWrites(QdrantServerStore):
    """Pauses before a conditional write of a classifier record while ``hold`` is clear."""

    def __init__(self, client: AsyncQdrantClient) -> None:
        super().__init__(client, "knn")
        self.hold = asyncio.Event()
        self.hold.set()
        self.holding = asyncio.Event()

    async def update_meta(self, key: str, fields: Payload, where: Payload) -> None:
        if not self.hold.is_set():
            self.holding.set()
            await self.hold.wait()
        await super().update_meta(key, fields, where)


@pytest.mark.parametrize("write", ["update", "add"])
async def test_a_replica_never_resurrects_a_classifier_another_deleted(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, write: str
) -> None:
    """Replica A read the record and is about to write it (UpdateClassifier, or the revision
    after AddExemplars wrote its points) when replica B deletes the classifier: A's write must
    not bring the record back, and A must not acknowledge."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    shared = AsyncQdrantClient(":memory:")
    store_a = PausingRecordWrites(shared)
    store_b = QdrantServerStore(shared, "knn")
    replica_a = await open_replica(settings, store_a)
    replica_b = await open_replica(settings, store_b)
    await replica_a.create_classifier(NewClassifier("c"))
    await replica_a.add_exemplars("c", [ExemplarInput("old words", "x")])
    store_a.hold.clear()
    writing: asyncio.Task[object]
    if write == "update":
        writing = asyncio.create_task(
            replica_a.update_classifier(ClassifierUpdate("c", ("k",), k=3))
        )
    else:
        writing = asyncio.create_task(
            replica_a.add_exemplars("c", [ExemplarInput("new words", "y")])
        )
    await store_a.holding.wait()
    assert await replica_b.delete_classifier("c") >= 1
    store_a.hold.set()
    with pytest.raises(NotFound):
        await writing
    assert (await replica_b.list_classifiers())[0] == []
    for dimension in settings.dimensions:
        assert await store_b.count(dimension, Selection("c")) == 0
    await replica_a.stop()
    await replica_b.stop()


async def test_a_write_that_waited_past_its_deadline_for_the_lock_does_not_start(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Writes to one classifier take turns (its lock) and run on when their caller leaves, so
    that none stops between dimensions. A write whose caller's deadline passed while it waited
    for its turn used to start anyway once it got the lock: the caller was told
    DEADLINE_EXCEEDED and the exemplar was stored. It must not start."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = PausingQdrantStore()
    replica = await open_replica(settings, store)
    await replica.create_classifier(NewClassifier("c"))
    store.hold.clear()
    first = asyncio.create_task(replica.add_exemplars("c", [ExemplarInput("one", "a", id="one")]))
    await asyncio.wait_for(store.holding.wait(), 60)  # holds the lock, inside its store write

    async def late() -> None:
        with deadlines.within(5.0):
            await replica.add_exemplars("c", [ExemplarInput("late", "a", id="late")])

    waiting = asyncio.create_task(late())
    holders = replica._classifiers._holders
    for _ in range(600):  # until the late write waits for the lock (embedded, checked)
        if holders.get("c") == 2 or waiting.done():
            break
        await asyncio.sleep(0.1)
    assert holders.get("c") == 2
    waiting.cancel()  # what grpc does to a handler at its deadline; the write itself runs on
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await asyncio.sleep(5.1)  # past the late write's deadline: any later would do as well
    store.hold.set()
    await first
    # The next write gets the lock after the late one has had its turn.
    await replica.add_exemplars("c", [ExemplarInput("after", "a", id="after")])
    stored = {
        dimension: {r.payload["id"] for r in (await store.vectors(dimension, "c"))[0]}
        for dimension in settings.dimensions
    }
    assert stored == {dimension: {"one", "after"} for dimension in settings.dimensions}
    await replica.stop()
