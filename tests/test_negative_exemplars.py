"""Negative exemplars (out-of-scope examples) through the real server, on the fake embedder.

The classifier holds texts of three topics (:mod:`test_open_set_api`); its negatives are texts of
a fourth vocabulary (weather), which no label has.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from knn_classifier.client import Client, InvalidArgumentError
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import EdgeStore, Record
from knn_classifier.server.vectors import Matrix
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_cli import ok, run, write_csv
from .test_evaluate_api import TOPICS
from .test_migrate import run_migrate
from .test_open_set_api import FOREIGN, foreign_texts, topical_texts

VOTINGS = ["majority", "softmax", "centroid", "discriminant", "mixture"]


class CountingStore(EdgeStore):
    """The embedded store, recording the (k, out_of_scope) of every neighbour query."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.queries: list[tuple[int, bool | None]] = []

    async def query(
        self,
        dimension: int,
        classifier: str,
        vectors: Matrix,
        k: int,
        out_of_scope: bool | None = None,
    ) -> list[list[Record]]:
        self.queries.append((k, out_of_scope))
        return await super().query(dimension, classifier, vectors, k, out_of_scope)


@pytest.fixture
def any_store(either_store: ServerThread) -> Iterator[Client]:
    with either_store.client() as client:
        yield client


def answers(client: Client, texts: list[str], voting: str) -> list[pb.Prediction]:
    return [
        client.classify("topics", text, voting=voting, include_neighbours=True) for text in texts
    ]


def test_a_text_nearest_a_negative_is_unknown_with_the_negative_as_neighbour(
    any_store: Client,
) -> None:
    client = any_store
    client.create_classifier("topics", k=5)
    client.add_exemplars("topics", topical_texts(90, seed=0))
    negatives = foreign_texts(10, seed=3)
    added = client.add_out_of_scope("topics", [(text, "weather") for text in negatives])
    assert len(added) == 10

    answer = client.classify("topics", negatives[0], include_neighbours=True)
    assert answer.unknown
    assert answer.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    first = answer.neighbours[0]
    assert (first.out_of_scope, first.label, first.text) == (True, "weather", negatives[0])
    assert first.similarity == pytest.approx(1.0, abs=1e-5)
    assert answer.top_similarity < first.similarity  # the nearest in-scope exemplar's
    assert not any(n.out_of_scope for n in answer.neighbours[1:])  # the rest are voters
    assert len(answer.neighbours) == 6
    # A new wording of the negatives' topic, never stored, is vetoed too.
    fresh = [t for t in foreign_texts(40, seed=4) if t not in negatives]
    vetoed = [client.classify("topics", t).unknown_reason for t in fresh]
    assert vetoed.count(pb.UNKNOWN_REASON_OUT_OF_SCOPE) > 0.8 * len(fresh)

    # Negatives are in no label; ListLabels and the exemplar count report them apart.
    assert client.list_labels("topics") == {"food": 30, "money": 30, "sport": 30}
    assert client.count_out_of_scope("topics") == 10
    assert client.get_classifier("topics").exemplar_count == 100
    listed = list(client.iter_exemplars("topics"))
    assert sum(e.out_of_scope for e in listed) == 10
    assert {e.label for e in listed if e.out_of_scope} == {"weather"}

    # Deleting them (by id, unchanged) ends the veto.
    client.delete_exemplars("topics", ids=list(added))
    assert client.count_out_of_scope("topics") == 0
    assert client.classify("topics", negatives[0]).unknown_reason != pb.UNKNOWN_REASON_OUT_OF_SCOPE


def test_negatives_never_vote_nor_change_label_models(client: Client) -> None:
    """Texts far from every negative get the same answers, scores and neighbours with and
    without negatives, under every voting method (the label models ignore negatives). k
    exceeds the exemplars, so every negative would be among the neighbours if it could vote."""
    client.create_classifier("topics", k=100)
    client.add_exemplars("topics", topical_texts(90, seed=0))
    texts = [text for text, _ in topical_texts(30, seed=5)]
    before = {voting: answers(client, texts, voting) for voting in VOTINGS}
    # Negatives without a topic label, and one with a label's name: neither votes for it.
    client.add_out_of_scope("topics", foreign_texts(20, seed=3))
    client.add_out_of_scope("topics", [("weather rain cloud w1", "food")])
    for voting in VOTINGS:
        after = answers(client, texts, voting)
        assert after == before[voting], voting
    assert all(not p.unknown for p in before["softmax"])


def test_a_classifier_without_negatives_makes_one_query_as_before(
    settings: Settings, tmp_path: Path
) -> None:
    store = CountingStore(tmp_path / "counted")
    running = ServerThread(settings, store).start()
    try:
        with running.client() as client:
            client.create_classifier("topics", k=5)
            client.add_exemplars("topics", topical_texts(30, seed=0))
            client.create_classifier("guarded", k=5)
            client.add_exemplars("guarded", topical_texts(30, seed=0))
            client.add_out_of_scope("guarded", foreign_texts(5, seed=3))
            store.queries.clear()
            client.classify("topics", "football match goal w3")
            assert store.queries == [(5, None)]
            store.queries.clear()
            client.classify("guarded", "football match goal w3")
            assert sorted(store.queries, key=str) == [(1, True), (5, False)]
            # Once its last negative is deleted, the classifier pays nothing again.
            ids = [e.id for e in client.iter_exemplars("guarded") if e.out_of_scope]
            client.delete_exemplars("guarded", ids=ids)
            store.queries.clear()
            client.classify("guarded", "football match goal w3")
            assert store.queries == [(5, None)]
    finally:
        running.stop()


def test_a_negative_needs_no_label_but_an_in_scope_exemplar_does(client: Client) -> None:
    client.create_classifier("topics")
    client.add_exemplars("topics", [pb.ExemplarInput(text="weather rain", out_of_scope=True)])
    with pytest.raises(InvalidArgumentError):
        client.add_exemplars("topics", [pb.ExemplarInput(text="weather rain", label="")])
    # Out-of-scope examples alone cannot answer.
    with pytest.raises(Exception, match="no exemplars"):
        client.classify("topics", "weather rain")


def test_apply_best_counts_exemplars_vetoed_by_negatives_as_rejected(client: Client) -> None:
    """6 of 150 in-scope exemplars have a negative of their very text, and a few more have one
    of those negatives nearest: more than the 2 % the target allows. The fitted threshold then
    keeps every other exemplar, so the rule keeps exactly the unvetoed ones in leave-one-out
    (CheckExemplars names the vetoed), not 98 % on top of the veto. Leave-one-out measures the
    in-scope exemplars only, the vetoed ones answered unknown."""
    exemplars = topical_texts(150, seed=0)
    client.create_classifier("topics", k=5)
    client.add_exemplars("topics", exemplars)
    response = client.evaluate("topics", apply_best=True)
    # Conformal: a new text falls under the 3rd lowest of 150 scores with chance 3 / 151 < 2 %.
    assert response.classifier.out_of_scope_threshold.coverage == pytest.approx(148 / 150)

    twins = [
        pb.ExemplarInput(id=f"twin-{i}", text=text, out_of_scope=True)
        for i, (text, _) in enumerate(exemplars[:6])
    ]
    client.add_exemplars("topics", twins)
    response = client.evaluate("topics", apply_best=True)
    report = client.check_exemplars("topics")
    vetoed = report.exemplars_nearest_out_of_scope_found
    assert vetoed >= 6
    assert {e.id for e in report.exemplars_nearest_out_of_scope} >= set(
        client.add_exemplars("topics", exemplars[:6])
    )
    assert (report.out_of_scope_exemplars, report.exemplar_count) == (6, 156)
    kept = (150 - vetoed) / 150
    assert response.classifier.out_of_scope_threshold.coverage == pytest.approx(kept)
    result = response.results[0]
    assert result.evaluated == 150
    assert sum(m.support for m in result.labels) == 150
    assert result.coverage <= kept + 1e-6
    assert response.classifier.exemplar_count == 156
    # Thresholds fitted to a precision: the vetoed answers are never kept, whatever they are.
    fitted = client.evaluate("topics", apply_best=True, target_precision=0.5).thresholds
    assert fitted.target_met
    assert fitted.coverage <= kept + 1e-6
    # Classify agrees: an in-scope exemplar's text with a negative twin is vetoed.
    answer = client.classify("topics", exemplars[0][0], include_neighbours=True)
    assert answer.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE


def near_texts(n: int, seed: int) -> list[str]:
    """Out-of-scope texts close to the sport label: two of its words and two weather words."""
    rng = random.Random(seed)
    sport, weather = TOPICS["sport"].split(), FOREIGN.split()
    return [" ".join(rng.sample(sport, 2) + rng.sample(weather, 2)) for _ in range(n)]


def test_held_out_evaluate_applies_the_veto(client: Client) -> None:
    """Near out-of-scope texts pass the out-of-scope score; negatives of their kind veto them,
    in Evaluate as in Classify."""
    client.create_classifier("topics", k=5)
    client.add_exemplars("topics", topical_texts(150, seed=0))
    held_out, outside = topical_texts(60, seed=1), near_texts(40, seed=2)
    before = client.evaluate("topics", held_out=held_out, out_of_scope=outside)
    client.add_out_of_scope("topics", near_texts(20, seed=3))
    after = client.evaluate("topics", held_out=held_out, out_of_scope=outside)
    assert after.results[0].out_of_scope.recall > before.results[0].out_of_scope.recall + 0.2
    assert after.results[0].evaluated == 60
    vetoed = [client.classify("topics", text).unknown_reason for text in outside]
    assert vetoed.count(pb.UNKNOWN_REASON_OUT_OF_SCOPE) > 0.4 * len(outside)


def test_cli_imports_negatives_and_export_import_keeps_the_flag(
    server: ServerThread, client: Client, tmp_path: Path
) -> None:
    rows = write_csv(
        tmp_path / "rows.csv",
        [
            ["text", "label", "out_of_scope"],
            ["football match goal team", "sport", ""],
            ["pizza pasta recipe cheese", "food", "false"],
            ["weather rain sun cloud", "", "true"],  # no label: fine for a negative
            ["storm wind snow forecast", "weather", "yes"],
            ["bank loan account card", "", ""],  # line 6: in scope without a label
        ],
    )
    ok(run(server, "create", "topics"))
    summary = json.loads(ok(run(server, "import", "topics", str(rows), "--json"), 3))
    assert (summary["added"], summary["rejected"]) == (4, 1)
    assert client.list_labels("topics") == {"sport": 1, "food": 1}
    assert client.count_out_of_scope("topics") == 2
    assert "2 out-of-scope example(s)" in ok(run(server, "labels", "topics"))
    # An in-scope exemplar nearest a negative is named by the hygiene report.
    added = client.add_exemplars("topics", [("weather rain sun cloud storm", "sport")])
    report = ok(run(server, "check", "topics"))
    assert "answered unknown: an out-of-scope example is nearest: " in report
    assert "weather rain sun cloud storm" in report
    client.delete_exemplars("topics", ids=list(added))
    # --out-of-scope: every row of a file with a text column only.
    texts = write_csv(tmp_path / "texts.csv", [["text"], ["weather forecast rain"]])
    ok(run(server, "import", "topics", str(texts), "--out-of-scope"))
    assert client.count_out_of_scope("topics") == 3

    def stored(name: str) -> list[tuple[str, str, str, bool]]:
        return sorted((e.id, e.text, e.label, e.out_of_scope) for e in client.iter_exemplars(name))

    for flags, copy in (((), "copy"), (("--vectors",), "copy-with-vectors")):
        export = tmp_path / f"{copy}.jsonl"
        ok(run(server, "export", "topics", "-o", str(export), *flags))
        assert sum('"out_of_scope": true' in line for line in export.read_text().splitlines()) == 3
        ok(run(server, "import", copy, str(export)))
        assert stored(copy) == stored("topics")
        again = json.loads(ok(run(server, "import", copy, str(export), "--json")))
        assert (again["added"], again["unchanged"]) == (0, 5)
        answer = client.classify(copy, "weather rain sun cloud", include_neighbours=True)
        assert answer.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE


def test_migration_keeps_the_flag(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    source = ServerThread(make_settings(tmp_path / "old", fake_embedder.base_url)).start()
    with source.client() as client:
        client.create_classifier("topics", k=3)
        client.add_exemplars("topics", topical_texts(9, seed=0))
        client.add_out_of_scope("topics", [("weather rain sun cloud", "weather")])
        before = sorted((e.id, e.label, e.out_of_scope) for e in client.iter_exemplars("topics"))
    source.stop()
    done = run_migrate(tmp_path / "old", tmp_path / "new", fake_embedder.base_url, "fake", "32,64")
    assert done.returncode == 0, done.stderr
    settings = make_settings(tmp_path / "new", fake_embedder.base_url, dimensions=[32, 64])
    target = ServerThread(settings).start()
    try:
        with target.client() as client:
            after = sorted((e.id, e.label, e.out_of_scope) for e in client.iter_exemplars("topics"))
            assert after == before
            answer = client.classify("topics", "weather rain sun cloud", include_neighbours=True)
            assert answer.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
            assert client.count_out_of_scope("topics") == 1
    finally:
        target.stop()
