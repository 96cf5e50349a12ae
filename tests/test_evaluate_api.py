"""Evaluate through the client, on the fake embedder; and exact agreement with scikit-learn."""

from __future__ import annotations

import math
import random
from typing import Literal

import numpy as np
import pytest
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis
from sklearn.neighbors import KNeighborsClassifier

from knn_classifier.client import Client, FailedPreconditionError, InvalidArgumentError
from knn_classifier.server import deadlines
from knn_classifier.server.domain import EvaluateRequest
from knn_classifier.server.errors import DeadlineExceeded
from knn_classifier.server.evaluate import Evaluation
from knn_classifier.server.voting import Voting
from knn_classifier.v1 import classifier_pb2 as pb

from . import references
from .conftest import ServerThread, predictions
from .fake_embedder import fake_vector

TOPICS = {
    "sport": "football match goal team player score league coach",
    "food": "pizza pasta recipe cheese dinner kitchen bake sauce",
    "money": "bank loan account card transfer payment credit cash",
}


def topical_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """Texts of two words from one topic's vocabulary and four random words."""
    rng = random.Random(seed)
    noise = [f"w{i}" for i in range(200)]
    rows = []
    for i in range(n):
        label = sorted(TOPICS)[i % len(TOPICS)]
        words = rng.sample(TOPICS[label].split(), 2) + rng.sample(noise, 4)
        rng.shuffle(words)
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture
def topics(client: Client) -> Client:
    client.create_classifier("topics", k=5)
    client.add_exemplars("topics", topical_texts(150, seed=0))
    return client


def test_leave_one_out_sweep_is_sorted_best_first(topics: Client) -> None:
    response = topics.evaluate(
        "topics", k=[1, 5, 15], voting=["majority", "similarity_weighted", "softmax"]
    )
    assert len(response.results) == 9
    accuracies = [r.accuracy for r in response.results]
    assert accuracies == sorted(accuracies, reverse=True)
    best = response.results[0]
    assert best.evaluated == 150
    assert 0.6 < best.accuracy < 0.99
    assert best.coverage == 1.0
    assert {m.label for m in best.labels} == set(TOPICS)
    assert sum(m.support for m in best.labels) == 150
    assert 0.0 <= best.expected_calibration_error <= 1.0
    assert best.dimension == 64  # the classifier's default: the largest dimension
    assert not response.classifier.calibrated  # nothing applied


def test_held_out_counts_unknown_labels_as_errors(topics: Client) -> None:
    held_out = [*topical_texts(30, seed=1), ("weather rain sun cloud", "weather")]
    response = topics.evaluate("topics", held_out=held_out, dimension=[16, 64])
    assert list(response.unknown_labels) == ["weather"]
    assert [r.evaluated for r in response.results] == [31, 31]
    best = response.results[0]
    assert best.accuracy <= 30 / 31
    weather = next(m for m in best.labels if m.label == "weather")
    assert (weather.support, weather.recall) == (1, 0.0)


def test_apply_best_sets_defaults_and_calibrates(topics: Client) -> None:
    response = topics.evaluate(
        "topics", k=[3, 9], voting=["majority", "softmax"], apply_best=True, target_precision=0.95
    )
    best = response.results[0]
    classifier = topics.get_classifier("topics")
    assert (classifier.k, classifier.voting) == (best.k, best.voting)
    assert classifier.calibrated
    assert classifier == response.classifier
    reached = response.thresholds
    assert reached.target_met
    assert reached.precision >= 0.95 > best.accuracy  # reached by abstaining on some texts
    assert 0.0 < reached.coverage < 1.0
    assert classifier.min_confidence > 0.0 or classifier.min_similarity > -1.0
    prediction = topics.classify("topics", "football goal w1 w2")
    assert 0.0 <= prediction.confidence <= 1.0
    held_out = topics.evaluate("topics", held_out=topical_texts(60, seed=2)).results[0]
    assert held_out.accuracy_on_covered >= held_out.accuracy


def test_a_target_precision_out_of_reach_leaves_the_thresholds(client: Client) -> None:
    """Two labels over one vocabulary: no thresholds make leave-one-out 95 % precise, so the
    classifier keeps answering, calibrated, and the response says the target was not met.
    (Fitting each threshold alone set min_similarity above every score: all unknown.)"""
    rng = random.Random(5)
    words = [f"v{i}" for i in range(40)]
    texts = list(dict.fromkeys(" ".join(rng.sample(words, 4)) for _ in range(120)))
    client.create_classifier("overlap", k=5)
    client.add_exemplars("overlap", [(t, "ab"[i % 2]) for i, t in enumerate(texts)])
    before = client.get_classifier("overlap")

    response = client.evaluate("overlap", apply_best=True, target_precision=0.95)
    reached = response.thresholds
    assert not reached.target_met
    assert reached.coverage == 1.0  # the thresholds as they were: every text is answered
    assert 0.3 < reached.precision < 0.8
    after = client.get_classifier("overlap")
    assert after.calibrated
    assert (after.min_similarity, after.min_confidence) == (
        before.min_similarity,
        before.min_confidence,
    )
    answers = predictions(client.classify_batch("overlap", texts[:20]))
    assert all(not a.unknown for a in answers)
    assert not client.evaluate("overlap").HasField("thresholds")  # only with target_precision


def test_label_models_fit_their_temperature_on_leave_one_out(topics: Client) -> None:
    """The temperature changes no label-model answer: leave-one-out fits it around the requested
    one, apply_best keeps the fitted one, and held-out evaluation uses what it is given."""
    response = topics.evaluate("topics", voting=["centroid"], temperature=[0.05], apply_best=True)
    fitted = response.results[0].temperature
    assert fitted != pytest.approx(0.05, rel=0.01)
    assert 0.05 * math.exp(-5) <= fitted <= 0.05 * math.exp(5)
    assert topics.get_classifier("topics").temperature == pytest.approx(fitted)
    held = topics.evaluate(
        "topics", held_out=topical_texts(30, seed=9), voting=["centroid"], temperature=[0.05]
    )
    assert held.results[0].temperature == pytest.approx(0.05)


def test_evaluate_needs_two_labels_and_two_exemplars(client: Client) -> None:
    client.create_classifier("single")
    client.add_exemplars("single", [("a b", "x"), ("c d", "x")])
    with pytest.raises(FailedPreconditionError, match="at least two"):
        client.evaluate("single")
    client.create_classifier("empty")
    with pytest.raises(FailedPreconditionError, match="0 exemplars"):
        client.evaluate("empty")


def test_bad_evaluate_requests(topics: Client) -> None:
    with pytest.raises(InvalidArgumentError, match="the limit is 64"):
        topics.evaluate(
            "topics", k=list(range(1, 30)), voting=["majority", "softmax", "similarity_weighted"]
        )
    with pytest.raises(InvalidArgumentError, match="leave-one-out"):
        topics.evaluate("topics", held_out=[("a", "b")], apply_best=True)
    with pytest.raises(InvalidArgumentError, match="dimension 7"):
        topics.evaluate("topics", dimension=[7])
    with pytest.raises(InvalidArgumentError, match="temperature"):
        topics.evaluate("topics", voting=["softmax"], temperature=[0.0])


def test_sweep_lists_are_bounded_and_deduplicated_before_expanding(topics: Client) -> None:
    """A 15 KB request of repeated values once made millions of combinations on the event loop
    (9 s for these two lists of 1,500, then one setting) before the sweep's size was checked."""
    with pytest.raises(InvalidArgumentError, match="k lists 1500 values; the limit is 64"):
        topics.evaluate("topics", k=[5] * 1500, temperature=[0.05] * 1500)
    # Lists at the bound: 64^4 combinations as written, 12 distinct settings (2 dimensions x
    # (2 k of softmax + 1 centroid) x 2 temperatures).
    response = topics.evaluate(
        "topics",
        k=[3, 5] * 32,
        voting=["softmax", "centroid"] * 32,
        dimension=[16, 64] * 32,
        temperature=[0.05, 0.1] * 32,
    )
    settings = {(r.k, r.voting, r.dimension, round(r.temperature, 6)) for r in response.results}
    assert len(response.results) == len(settings) == 12


def test_the_evaluator_proposes_and_writes_nothing(topics: Client, server: ServerThread) -> None:
    """apply_best's result is stored by the service, which owns the classifier's record (a
    write by the evaluator after its sweep brought back a classifier deleted meanwhile)."""
    assert server.app is not None
    service = server.app.service

    async def propose() -> Evaluation:
        config = (await service.get_classifier("topics")).config
        request = EvaluateRequest(apply_best=True, target_precision=0.95)
        return await service._evaluator.evaluate(config, request)

    evaluation = server.run(propose())
    assert evaluation.updated is not None
    assert evaluation.updated.calibration is not None
    assert evaluation.reached is not None
    assert not topics.get_classifier("topics").calibrated


def test_a_passed_deadline_stops_the_sweep(topics: Client, server: ServerThread) -> None:
    assert server.app is not None
    service = server.app.service

    async def late() -> object:
        with deadlines.within(-1):
            return await service.evaluate("topics", EvaluateRequest(k=[1, 3]))

    with pytest.raises(DeadlineExceeded, match="before the next setting"):
        server.run(late())

    async def late_leave_one_out() -> object:
        with deadlines.within(-1):
            return await service.evaluate("topics", EvaluateRequest(voting=[Voting.DISCRIMINANT]))

    with pytest.raises(DeadlineExceeded, match="discriminant leave-one-out"):
        server.run(late_leave_one_out())


@pytest.mark.parametrize(("k", "labels"), [(5, 2), (7, 2), (1, 5)])
def test_plain_knn_agrees_exactly_with_scikit_learn(client: Client, k: int, labels: int) -> None:
    """Majority voting with no ties possible (odd k over two labels, or k=1)."""
    rng = random.Random(k * 10 + labels)
    words = [f"v{i}" for i in range(60)]

    def text() -> str:
        return " ".join(rng.sample(words, 4))

    train = [(text(), f"label{rng.randrange(labels)}") for _ in range(200)]
    train = list(dict(train).items())  # one label per text
    queries = [text() for _ in range(100)]
    client.create_classifier("agree")
    client.add_exemplars("agree", train)
    ours = [
        p.label
        for p in predictions(client.classify_batch("agree", queries, k=k, voting="majority"))
    ]

    vectors = np.vstack([fake_vector(t, 64) for t, _ in train])
    reference = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
    reference.fit(vectors, [label for _, label in train])
    theirs = reference.predict(np.vstack([fake_vector(q, 64) for q in queries])).tolist()
    assert ours == theirs
    assert len(set(ours)) > 1


def label_scored(
    client: Client, voting: Literal["centroid", "discriminant"]
) -> tuple[list[tuple[str, str]], list[str], list[pb.Prediction]]:
    """Sixty topical exemplars in a classifier named after ``voting``, forty queries, and their
    answers under ``voting`` at temperature 0.05."""
    train = topical_texts(60, seed=3)
    queries = [text for text, _ in topical_texts(40, seed=4)]
    client.create_classifier(voting)
    client.add_exemplars(voting, train)
    answers = client.classify_batch(voting, queries, voting=voting, temperature=0.05)
    return train, queries, predictions(answers)


def top_shares(scores: np.ndarray) -> np.ndarray:
    """Each row's largest share of exp(score / 0.05)."""
    shares = np.exp((scores - scores.max(axis=1, keepdims=True)) / 0.05)
    return np.asarray((shares / shares.sum(axis=1, keepdims=True)).max(axis=1))


def test_centroid_voting_picks_the_nearest_label_centroid(client: Client) -> None:
    """Classify and held-out Evaluate with centroid voting agree with a numpy reference: the
    similarity to each label's mean, over its length less the pooled variance / n."""
    train, queries, answers = label_scored(client, "centroid")
    vectors = np.vstack([fake_vector(text, 64) for text, _ in train])
    labels = [label for _, label in train]
    noise = references.centroid_noise(labels, vectors)
    query_vectors = np.vstack([fake_vector(q, 64) for q in queries])
    names, similarities = references.centroid_scores(labels, vectors, query_vectors, noise)
    assert [a.label for a in answers] == [names[i] for i in similarities.argmax(axis=1)]
    np.testing.assert_allclose([a.confidence for a in answers], top_shares(similarities), rtol=1e-4)

    held = client.evaluate(
        "centroid",
        held_out=list(zip(queries, [a.label for a in answers], strict=True)),
        voting=["centroid"],
        temperature=[0.05],
    )
    assert held.results[0].accuracy == pytest.approx(1.0)


def test_discriminant_voting_matches_scikit_learn_lda(client: Client) -> None:
    """With as many exemplars per label, discriminant voting is shrunk LDA with equal priors."""
    train, queries, answers = label_scored(client, "discriminant")
    vectors = np.vstack([fake_vector(t, 64) for t, _ in train])
    labels = [label for _, label in train]
    weight = 64 / (64 + len(train) - 3)  # the identity's weight: d / (d + n - L)
    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=weight, priors=[1 / 3] * 3)
    reference.fit(vectors, labels)
    query_vectors = np.vstack([fake_vector(q, 64) for q in queries])
    assert [a.label for a in answers] == reference.predict(query_vectors).tolist()
    assert len({a.label for a in answers}) == 3
    # Our covariance is scikit-learn's divided by its mean variance, which scales the scores.
    residuals = vectors - np.vstack([vectors[[m == x for m in labels]].mean(0) for x in labels])
    mean_variance = np.sum(residuals**2) / residuals.size
    scores = mean_variance * reference.decision_function(query_vectors)
    np.testing.assert_allclose([a.confidence for a in answers], top_shares(scores), rtol=1e-3)


def test_discriminant_leave_one_out_through_evaluate(client: Client) -> None:
    """Leave-one-out accuracy is that of the reference discriminant refitted without each
    exemplar in turn (the noise it is debiased by kept from all exemplars)."""
    train = topical_texts(45, seed=8)
    client.create_classifier("lda-loo")
    client.add_exemplars("lda-loo", train)
    result = client.evaluate("lda-loo", voting=["discriminant"]).results[0]

    vectors = np.vstack([fake_vector(t, 64) for t, _ in train]).astype(np.float32)
    labels = [label for _, label in train]
    noise = references.discriminant_noise(labels, vectors)
    right = 0
    for i, label in enumerate(labels):
        others = np.arange(len(train)) != i
        names, scores = references.discriminant_scores(
            [x for x, other in zip(labels, others, strict=True) if other],
            vectors[others],
            vectors[i : i + 1],
            noise,
        )
        right += names[int(scores[0].argmax())] == label
    expected = right / len(train)
    assert 0.3 < expected < 1.0  # the check below can tell right from wrong
    assert result.accuracy == pytest.approx(expected)
