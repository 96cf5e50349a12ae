"""Label models are fitted once per revision of a classifier: on both stores, and across replicas
sharing one Qdrant store, where a write through one replica changes the next answer of another.

Fits are counted with the service's own metric (``knn_model_fit_seconds``), whose count is the
number of fits.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.client._requests import VotingName
from knn_classifier.server import label_models
from knn_classifier.server.app import build_embedding
from knn_classifier.server.domain import (
    ClassifierUpdate,
    ClassifyOptions,
    ExemplarInput,
    NewClassifier,
)
from knn_classifier.server.errors import NotFound
from knn_classifier.server.metrics import Metrics
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import Store
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.server.voting import Vote, Voting

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

EXEMPLARS = [
    ("red apple fruit", "fruit"),
    ("green pear fruit", "fruit"),
    ("fast red car", "car"),
    ("old blue car", "car"),
]
LABEL_MODELS: list[VotingName] = ["centroid", "discriminant"]


def fits(metrics: Metrics, voting: str) -> float:
    """How many times the label model of ``voting`` was fitted."""
    kind = {"kind": f"label-model:{label_models.FIT[Voting(voting)].__name__}"}
    return metrics.registry.get_sample_value("knn_model_fit_seconds_count", kind) or 0.0


def test_label_models_are_fitted_once_per_revision_not_per_call(
    either_store: ServerThread,
) -> None:
    assert either_store.app is not None
    metrics = either_store.app.metrics
    with either_store.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", EXEMPLARS)
        for voting in LABEL_MODELS:
            for _ in range(3):
                assert client.classify("c", "red apple", voting=voting).label == "fruit"
            assert fits(metrics, voting) == 1
        client.add_exemplars("c", [("yellow banana", "banana")])
        for voting in LABEL_MODELS:
            for _ in range(3):
                assert client.classify("c", "yellow banana", voting=voting).label == "banana"
            assert fits(metrics, voting) == 2
        # Other voting methods need no label model.
        client.classify("c", "yellow banana", voting="softmax")
        assert sum(fits(metrics, voting) for voting in LABEL_MODELS) == 4


async def open_replica(settings: Settings, store: Store, metrics: Metrics) -> ClassifierService:
    service = ClassifierService(settings, build_embedding(settings), store, metrics)
    await service.start()
    return service


class Replicas:
    """Two service instances sharing one Qdrant store (one in-memory client), as two replicas
    of the service share one Qdrant server."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.shared = AsyncQdrantClient(":memory:")
        self.a_metrics, self.b_metrics = Metrics(), Metrics()

    async def __aenter__(self) -> tuple[ClassifierService, ClassifierService]:
        self.a = await open_replica(
            self.settings, QdrantServerStore(self.shared, "knn"), self.a_metrics
        )
        self.b = await open_replica(
            self.settings, QdrantServerStore(self.shared, "knn"), self.b_metrics
        )
        return self.a, self.b

    async def __aexit__(self, *_: object) -> None:
        await self.a.stop()
        await self.b.stop()


async def classify(replica: ClassifierService, text: str, voting: str) -> Vote:
    (answer,), _ = await replica.classify("c", [text], ClassifyOptions(voting=Voting(voting)))
    assert isinstance(answer, Vote)
    return answer


def labels_scored(answer: Vote) -> set[str]:
    return {label for label, _ in answer.scores}


async def test_a_write_through_one_replica_changes_the_next_answer_of_the_other(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    replicas = Replicas(make_settings(tmp_path, fake_embedder.base_url))
    async with replicas as (a, b):
        await a.create_classifier(NewClassifier("c"))
        await a.add_exemplars("c", [ExemplarInput(text, label) for text, label in EXEMPLARS])
        for voting in LABEL_MODELS:
            before = await classify(b, "yellow banana", voting)
            assert labels_scored(before) == {"fruit", "car"}

        await a.add_exemplars("c", [ExemplarInput("yellow banana", "banana")])
        for voting in LABEL_MODELS:
            for _ in range(3):
                after = await classify(b, "yellow banana", voting)
                assert after.label == "banana"
                assert after.voters[0].text == "yellow banana"  # the neighbours too
            assert fits(replicas.b_metrics, voting) == 2

        deleted_count, _ = await a.delete_exemplars("c", label="banana")
        assert deleted_count == 1
        for voting in LABEL_MODELS:
            for _ in range(3):
                deleted = await classify(b, "yellow banana", voting)
                assert labels_scored(deleted) == {"fruit", "car"}
                assert "yellow banana" not in {n.text for n in deleted.voters}
            assert fits(replicas.b_metrics, voting) == 3

        await a.delete_classifier("c")
        for voting in LABEL_MODELS:
            with pytest.raises(NotFound):
                await classify(b, "yellow banana", voting)
        assert fits(replicas.a_metrics, "centroid") == 0  # A never classified


async def test_settings_changed_through_one_replica_are_the_others_next_answer(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Each replica parses a record again only when it changed: a change made by another
    replica is one, however many calls read the record before."""
    replicas = Replicas(make_settings(tmp_path, fake_embedder.base_url))
    async with replicas as (a, b):
        await a.create_classifier(NewClassifier("c"))
        await a.add_exemplars("c", [ExemplarInput(text, label) for text, label in EXEMPLARS])
        for _ in range(3):
            assert len((await classify(b, "red apple", "majority")).voters) == 4
        await a.update_classifier(ClassifierUpdate("c", ("k",), k=1))
        assert len((await classify(b, "red apple", "majority")).voters) == 1
        assert (await b.get_classifier("c")).config.k == 1


async def test_a_classifier_created_again_is_never_answered_from_the_old_ones_model(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Deleted and created again through A, the classifier is back at the same revision: B must
    still tell the two apart (the incarnation is part of the key)."""
    replicas = Replicas(make_settings(tmp_path, fake_embedder.base_url))
    async with replicas as (a, b):
        await a.create_classifier(NewClassifier("c"))
        await a.add_exemplars("c", [ExemplarInput(text, label) for text, label in EXEMPLARS])
        old = await classify(b, "red apple", "centroid")
        assert old.label == "fruit"
        old_revision = (await b.get_classifier("c")).config.revision

        await a.delete_classifier("c")
        await a.create_classifier(NewClassifier("c"))
        await a.add_exemplars(
            "c", [ExemplarInput(text, label.upper()) for text, label in EXEMPLARS]
        )
        assert (await b.get_classifier("c")).config.revision == old_revision
        new = await classify(b, "red apple", "centroid")
        assert new.label == "FRUIT"
        assert labels_scored(new) == {"FRUIT", "CAR"}
        assert fits(replicas.b_metrics, "centroid") == 2


def test_models_beyond_the_configured_bound_are_dropped_and_fitted_again(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, store={"model_cache_entries": 1})
    running = ServerThread(settings).start()
    try:
        assert running.app is not None
        metrics = running.app.metrics
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", EXEMPLARS)
            order: list[VotingName] = ["centroid", "discriminant", "centroid", "centroid"]
            for voting in order:
                assert client.classify("c", "red apple", voting=voting).label == "fruit"
        assert fits(metrics, "centroid") == 2  # dropped for the discriminant's, then kept
        assert fits(metrics, "discriminant") == 1
    finally:
        running.stop()
