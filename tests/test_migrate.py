"""knn-classifier-migrate: copying a deployment into a new store, to another embedder or not."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.client import Client
from knn_classifier.server.app import build_embedding
from knn_classifier.server.domain import ClassifyOptions
from knn_classifier.server.migrate import Source, migrate
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.server.voting import Vote
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

LONG = "a long text " * 30  # 360 characters: refused by an embedder that takes 200


def texts(name: str) -> list[str]:
    return [f"{name} text {i} about topic{i % 3}" for i in range(10)]


def write_source(data_dir: Path, base_url: str, long_text: bool = False) -> None:
    """Classifiers "a" and "b" with 10 exemplars each (metadata, a threshold, a calibration)."""
    running = ServerThread(make_settings(data_dir, base_url)).start()
    with running.client() as client:
        client.create_classifier("a", instruction="Topic of a", k=3, min_similarity=0.05)
        client.create_classifier("b", instruction="Topic of b", k=5)
        for name in ("a", "b"):
            items = [
                pb.ExemplarInput(text=t, label=f"t{i % 3}", metadata={"row": str(i)})
                for i, t in enumerate(texts(name))
            ]
            if long_text and name == "b":
                items[-1] = pb.ExemplarInput(text=LONG, label="t0")
            client.add_exemplars(name, items)
        client.evaluate("a", apply_best=True)  # fits a calibration
    running.stop()


def contents(client: Client) -> dict[str, Any]:
    """Every classifier's record fields and exemplars, as the API shows them."""
    found: dict[str, Any] = {}
    for c in client.list_classifiers():
        exemplars = sorted(
            (e.id, e.text, e.label, dict(e.metadata), e.created_at.ToNanoseconds())
            for e in client.iter_exemplars(c.name)
        )
        record = (c.instruction, c.k, c.voting, c.min_similarity, c.min_confidence, c.temperature)
        found[c.name] = (record, c.created_at.ToNanoseconds(), c.exemplar_count, exemplars)
    return found


Fitted = tuple[bool, pb.OutOfScopeThreshold | None]


def fitted(classifier: pb.Classifier) -> Fitted:
    """Whether it is calibrated, and its out-of-scope rule if it has one."""
    rule = classifier.out_of_scope_threshold
    return classifier.calibrated, rule if classifier.HasField("out_of_scope_threshold") else None


def read(
    data_dir: Path, base_url: str, **settings: Any
) -> tuple[dict[str, Any], dict[str, Fitted]]:
    """The contents of a store, after checking that each exemplar is its own nearest neighbour
    at similarity 1 in every dimension; and whether each classifier is calibrated, and its
    out-of-scope rule."""
    running = ServerThread(make_settings(data_dir, base_url, **settings)).start()
    try:
        with running.client() as client:
            found = contents(client)
            for name, (*_, exemplars) in found.items():
                for exemplar_id, text, *_ in exemplars:
                    for d in client.get_service_info().dimensions:
                        top = client.classify(name, text, k=1, dimension=d, include_neighbours=True)
                        assert top.neighbours[0].id == exemplar_id
                        assert top.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)
            calibrated = {c.name: fitted(c) for c in client.list_classifiers()}
    finally:
        running.stop()
    return found, calibrated


def run_migrate(
    source: Path, target: Path, base_url: str, model: str, dimensions: str, *flags: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "KNN_DATA_DIR": str(target),
        "KNN_DIMENSIONS": dimensions,
        "KNN_EMBEDDING__BASE_URL": base_url,
        "KNN_EMBEDDING__MODEL": model,
        "KNN_EMBEDDING__TEMPLATE": "{text}",
        "KNN_EMBEDDING__CACHE_ENTRIES": "0",
    }
    command = [sys.executable, "-m", "knn_classifier.server.migrate"]
    return subprocess.run(
        [*command, "--from-data-dir", str(source), *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def stored_texts(data_dir: Path) -> dict[str, set[str]]:
    """The texts of each classifier's exemplars in an embedded store."""

    async def scan() -> dict[str, set[str]]:
        store = EdgeStore(data_dir)
        await store.open([16])
        try:
            found = {}
            for name in ("a", "b"):
                records, _ = await store.scroll(16, Selection(name), 100, None)
                found[name] = {str(r.payload["text"]) for r in records}
            return found
        finally:
            await store.close()

    return asyncio.run(scan())


def embedded(fake: FakeEmbeddingServer) -> list[str]:
    """The texts sent to the fake embedder, apart from start-up's probe."""
    return [t for call in fake.behaviour.inputs for t in call if t != "dimension probe"]


def test_migrating_to_another_embedder_embeds_every_text_once(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    write_source(tmp_path / "old", fake_embedder.base_url)
    before, _ = read(tmp_path / "old", fake_embedder.base_url)
    fake_embedder.reset(width=32)  # the new embedder

    done = run_migrate(tmp_path / "old", tmp_path / "new", fake_embedder.base_url, "v2", "16,32")

    assert done.returncode == 0, done.stderr
    assert sorted(embedded(fake_embedder)) == sorted(texts("a") + texts("b"))
    assert "classifier a: 10/10" in done.stderr
    assert "a: 10 exemplars, 10 written (10 embedded), 0 already there" in done.stdout
    assert "knn-classifier evaluate a --apply-best" in done.stdout
    assert f"KNN_DATA_DIR={tmp_path / 'new'}" in done.stdout
    v2 = {"dimensions": [16, 32], "embedding": {"model": "v2"}}
    after, calibrated = read(tmp_path / "new", fake_embedder.base_url, **v2)
    assert after == before
    # Fitted to the old vectors: dropped.
    assert calibrated == {"a": (False, None), "b": (False, None)}


def test_migrating_with_the_same_embedder_copies_the_vectors(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    write_source(tmp_path / "old", fake_embedder.base_url)
    before, calibrated_before = read(tmp_path / "old", fake_embedder.base_url)
    fake_embedder.reset()

    done = run_migrate(tmp_path / "old", tmp_path / "new", fake_embedder.base_url, "fake", "32,64")

    assert done.returncode == 0, done.stderr
    assert embedded(fake_embedder) == []  # no embedding call but the probe
    assert "copying the vectors of dimension 64" in done.stderr
    after, calibrated = read(tmp_path / "new", fake_embedder.base_url, dimensions=[32, 64])
    assert after == before
    assert calibrated == calibrated_before  # the out-of-scope rule exactly
    assert calibrated["a"][0]
    assert calibrated["a"][1] is not None
    assert calibrated["b"] == (False, None)


def test_a_migration_stopped_by_an_error_continues_where_it_stopped(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    write_source(tmp_path / "old", fake_embedder.base_url, long_text=True)
    fake_embedder.reset(width=32, max_input_chars=200)  # refuses b's long text
    args = (tmp_path / "old", tmp_path / "new", fake_embedder.base_url, "v2", "16,32")

    first = run_migrate(*args, "--batch-size", "3")

    assert first.returncode == 1
    assert "of classifier 'b': the embedding model rejected the input" in first.stderr
    assert "Traceback" not in first.stderr
    stored = stored_texts(tmp_path / "new")
    assert stored["a"] == set(texts("a"))
    assert len(stored["b"]) % 3 == 0  # whole batches of b, up to the one with the long text
    fake_embedder.reset(width=32)
    second = run_migrate(*args, "--batch-size", "3")

    assert second.returncode == 0, second.stderr
    again = embedded(fake_embedder)
    assert "a: 10 exemplars, 0 written (0 embedded), 10 already there" in second.stdout
    assert f"b: 10 exemplars, {len(again)} written ({len(again)} embedded)" in second.stdout
    assert set(again) == {*texts("b")[:-1], LONG} - stored["b"]  # only the rest
    v2 = {"dimensions": [16, 32], "embedding": {"model": "v2"}}
    after, _ = read(tmp_path / "new", fake_embedder.base_url, **v2)
    assert {name: count for name, (_, _, count, _) in after.items()} == {"a": 10, "b": 10}


def test_a_classifier_of_the_same_name_with_another_instruction_is_refused(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    write_source(tmp_path / "old", fake_embedder.base_url)
    running = ServerThread(make_settings(tmp_path / "new", fake_embedder.base_url)).start()
    with running.client() as client:
        client.create_classifier("b", instruction="Something else")
    running.stop()

    done = run_migrate(tmp_path / "old", tmp_path / "new", fake_embedder.base_url, "fake", "16,64")

    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "knn-classifier-migrate: the target already holds a classifier 'b' with another "
        "instruction ('Something else', not 'Topic of b'); delete it there or migrate into "
        "another store"
    )
    running = ServerThread(make_settings(tmp_path / "new", fake_embedder.base_url)).start()
    with running.client() as client:
        assert [c.name for c in client.list_classifiers()] == ["b"]  # nothing was written
    running.stop()


async def test_migrating_into_a_qdrant_server_store(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    write_source(tmp_path / "old", fake_embedder.base_url)
    fake_embedder.reset(width=32)
    settings = make_settings(
        tmp_path / "unused", fake_embedder.base_url, dimensions=[16, 32], embedding={"model": "v2"}
    )
    store = QdrantServerStore(AsyncQdrantClient(":memory:"), "v2")
    target = ClassifierService(settings, build_embedding(settings), store)
    await target.start()
    source_store = EdgeStore(tmp_path / "old")
    try:
        source = await Source.open(source_store, "the old data")
        copied = await migrate(source, target, batch_size=4)
        assert [(c.classifier, c.exemplars, c.embedded) for c in copied] == [
            ("a", 10, 10),
            ("b", 10, 10),
        ]
        info = await target.get_classifier("a")
        assert (info.config.instruction, info.config.k, info.exemplar_count) == (
            "Topic of a",
            3,
            10,
        )
        for name in ("a", "b"):
            for d in (16, 32):
                votes, _ = await target.classify(
                    name, texts(name), ClassifyOptions(k=1, dimension=d)
                )
                for vote, text in zip(votes, texts(name), strict=True):
                    assert isinstance(vote, Vote)
                    assert vote.voters[0].text == text
                    assert vote.top_similarity == pytest.approx(1.0, abs=1e-5)
        again = await migrate(source, target, batch_size=4)
        assert [c.written for c in again] == [0, 0]
    finally:
        await source_store.close()
        await target.stop()
