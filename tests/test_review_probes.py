"""Probes of this session's changes that found defects (review, 2026-11-30)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from knn_classifier.client import Client
from knn_classifier.server.domain import ExemplarInput, NewClassifier
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_cli import ok, run, write_csv
from .test_integrity import PausingQdrantStore, open_replica


@pytest.fixture
def cached(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    """A server with the in-memory embedding cache on."""
    settings = make_settings(
        tmp_path / "data", fake_embedder.base_url, embedding={"cache_entries": 1000}
    )
    running = ServerThread(settings).start()
    yield running
    running.stop()


def classify_while_a_negative_is_added(
    server: ServerThread, fake_embedder: FakeEmbeddingServer, text: str, topic: str
) -> pb.Prediction:
    """Classifies ``text`` with classifier "c" while, between its record read and its query,
    another client adds the negative "rain cloud storm" (named ``topic``) to "c"."""
    with server.client() as warm:  # embeds the negative's text into the cache: its add waits
        warm.create_classifier("warm", k=1)  # for no embedding call while the gate is held
        warm.add_exemplars("warm", [("rain cloud storm", "w")])
    gate = fake_embedder.hold()
    answer: list[pb.Prediction] = []
    try:
        with server.client() as client:
            thread = threading.Thread(
                target=lambda: answer.append(client.classify("c", text, include_neighbours=True))
            )
            thread.start()
            fake_embedder.wait_for_held(1)  # the Classify has read the record, unmarked
            with server.client() as other:
                other.add_out_of_scope("c", [("rain cloud storm", topic)])  # a cache hit
            gate.set()
            thread.join(timeout=60)
    finally:
        gate.set()
    (prediction,) = answer
    return prediction


def test_a_negative_added_while_a_classify_embeds_never_votes(
    cached: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    """A Classify that read the record before its first negative was marked, and queries after
    the negative is stored, must not let the negative vote (nor lose the veto)."""
    client = cached.client()
    client.create_classifier("c", k=1)
    client.add_exemplars("c", [("alpha beta gamma", "a")])
    prediction = classify_while_a_negative_is_added(cached, fake_embedder, "storm cloud rain", "")
    assert prediction.unknown, prediction
    assert prediction.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    assert prediction.neighbours[0].out_of_scope


def test_a_negative_added_while_a_classify_embeds_is_in_no_label_model(
    cached: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    """The label models a Classify fits for the record it read before the first negative was
    marked leave out the negative stored meanwhile: its topic label is never an answer."""
    client = cached.client()
    client.create_classifier("c", k=3, voting="centroid")
    client.add_exemplars("c", [("rain x", "a"), ("sun y", "a"), ("alpha beta", "b")])
    prediction = classify_while_a_negative_is_added(
        cached, fake_embedder, "rain x cloud", "weather"
    )
    assert prediction.label == "a", prediction
    assert "weather" not in {s.label for s in prediction.scores}


async def test_a_delete_through_one_replica_never_unmarks_a_negative_another_is_adding(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Replica A adds a negative to a classifier already marked (so it does not mark it
    again) while replica B deletes the only other negative and, counting none, clears the
    mark: A's write must leave the record marked, or ListLabels counts the negative in a
    label and Classify treats the classifier as holding none."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store = PausingQdrantStore()
    replica_a = await open_replica(settings, store)
    replica_b = await open_replica(settings, store)
    try:
        await replica_a.create_classifier(NewClassifier("c"))
        await replica_a.add_exemplars("c", [ExemplarInput("alpha beta", "a")])
        (first,), _ = await replica_a.add_exemplars(
            "c", [ExemplarInput("rain cloud", "", out_of_scope=True)]
        )
        store.hold.clear()
        adding = asyncio.create_task(
            replica_a.add_exemplars(
                "c", [ExemplarInput("storm wind", "weather", out_of_scope=True)]
            )
        )
        await store.holding.wait()
        deleted, _ = await replica_b.delete_exemplars("c", ids=[first])
        assert deleted == 1
        store.hold.set()
        await adding
        labels, _, negatives, _ = await replica_b.list_labels("c")
        assert (labels, negatives) == ([("a", 1)], 1)
        assert (await replica_b.get_classifier("c")).config.holds_negatives
    finally:
        store.hold.set()
        await replica_a.stop()
        await replica_b.stop()


def test_cli_import_rejects_an_out_of_scope_value_it_cannot_read(
    server: ServerThread, client: Client, tmp_path: Path
) -> None:
    """A value of the out_of_scope column that is neither yes nor no (a typo, "y", "oos")
    rejects its row: read as no, it made a labelled negative a voting exemplar silently."""
    rows = write_csv(
        tmp_path / "rows.csv",
        [
            ["text", "label", "out_of_scope"],
            ["football match goal team", "sport", "no"],
            ["storm wind snow forecast", "weather", "y"],  # line 3
            ["rain cloud sun", "weather", "ture"],  # line 4
            ["pizza pasta", "food", "0"],
        ],
    )
    ok(run(server, "create", "topics"))
    summary = json.loads(ok(run(server, "import", "topics", str(rows), "--json"), 3))
    assert (summary["added"], summary["rejected"]) == (2, 2)
    assert client.list_labels("topics") == {"sport": 1, "food": 1}
