"""Probes of this session's changes that found defects (review, 2026-11-30)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from knn_classifier.client import Client
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer


@pytest.fixture
def cached(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    """A server with the in-memory embedding cache on."""
    settings = make_settings(
        tmp_path / "data", fake_embedder.base_url, embedding={"cache_entries": 1000}
    )
    running = ServerThread(settings).start()
    yield running
    running.stop()


def test_a_negative_added_while_a_classify_embeds_never_votes(
    cached: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    """A Classify that read the record before its first negative was marked, and queries after
    the negative is stored, must not let the negative vote (nor lose the veto)."""
    server = cached
    client = server.client()
    client.create_classifier("c", k=1)
    client.add_exemplars("c", [("alpha beta gamma", "a")])
    client.create_classifier("warm", k=1)  # embeds the negative's text into the cache
    client.add_exemplars("warm", [("rain cloud storm", "w")])
    gate = fake_embedder.hold()
    answer: list[pb.Prediction] = []
    try:
        thread = threading.Thread(
            target=lambda: answer.append(
                client.classify("c", "storm cloud rain", include_neighbours=True)
            )
        )
        thread.start()
        fake_embedder.wait_for_held(1)  # the Classify has read the record, unmarked
        with server.client() as other:
            other.add_out_of_scope("c", [("rain cloud storm", "")])  # a cache hit
    finally:
        gate.set()
    thread.join(timeout=60)
    (prediction,) = answer
    assert prediction.unknown, prediction
    assert prediction.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    assert prediction.neighbours[0].out_of_scope


def test_a_negative_added_while_a_classify_embeds_is_in_no_label_model(
    cached: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    """The label models a Classify fits for the record it read before the first negative was
    marked leave out the negative stored meanwhile: its topic label is never an answer."""
    server = cached
    client = server.client()
    client.create_classifier("c", k=3, voting="centroid")
    client.add_exemplars("c", [("rain x", "a"), ("sun y", "a"), ("alpha beta", "b")])
    client.create_classifier("warm", k=1)  # embeds the negative's text into the cache
    client.add_exemplars("warm", [("rain cloud storm", "w")])
    gate = fake_embedder.hold()
    answer: list[pb.Prediction] = []
    try:
        thread = threading.Thread(
            target=lambda: answer.append(
                client.classify("c", "rain x cloud", include_neighbours=True)
            )
        )
        thread.start()
        fake_embedder.wait_for_held(1)  # the Classify has read the record, unmarked
        with server.client() as other:
            other.add_out_of_scope("c", [("rain cloud storm", "weather")])  # a cache hit
    finally:
        gate.set()
    thread.join(timeout=60)
    (prediction,) = answer
    assert prediction.label == "a", prediction
    assert "weather" not in {s.label for s in prediction.scores}
