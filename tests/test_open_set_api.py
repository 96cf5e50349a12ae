"""Out-of-scope texts, ambiguity and mixture voting through the real server, on the fake embedder.

The classifier holds texts of three topics, each three words of its topic's vocabulary and one
of 200 shared noise words; out-of-scope texts take their topic words from a fourth vocabulary.
"""

from __future__ import annotations

import dataclasses
import random

import grpc
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from knn_classifier.client import AsyncClient, Client, InvalidArgumentError
from knn_classifier.server import open_set, out_of_scope, transfer
from knn_classifier.server.domain import ClassifierConfig
from knn_classifier.server.out_of_scope import OutOfScopeFit
from knn_classifier.server.voting import (
    MIXTURE_WEIGHT,
    Neighbour,
    ScopeCheck,
    UnknownReason,
    Voting,
    vote,
)
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread
from .test_evaluate_api import TOPICS

FOREIGN = "weather rain sun cloud storm wind snow forecast"
FAR_TEXT = "weather rain storm forecast"


def texts_of(vocabulary: str, rng: random.Random) -> str:
    words = [*rng.sample(vocabulary.split(), 3), f"w{rng.randrange(200)}"]
    rng.shuffle(words)
    return " ".join(words)


def topical_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """In-scope texts: three words of their topic's vocabulary and a noise word."""
    rng = random.Random(seed)
    labels = sorted(TOPICS)
    return [(texts_of(TOPICS[labels[i % 3]], rng), labels[i % 3]) for i in range(n)]


def foreign_texts(n: int, seed: int) -> list[str]:
    """Out-of-scope texts: three words of a vocabulary no label has and a noise word."""
    rng = random.Random(seed)
    return [texts_of(FOREIGN, rng) for _ in range(n)]


@pytest.fixture
def topics(client: Client) -> Client:
    client.create_classifier("topics", k=5)
    client.add_exemplars("topics", topical_texts(150, seed=0))
    return client


def test_evaluate_measures_texts_marked_out_of_scope(topics: Client) -> None:
    response = topics.evaluate(
        "topics",
        held_out=topical_texts(60, seed=1),
        out_of_scope=foreign_texts(40, seed=2),
        voting=["softmax", "discriminant"],
    )
    for result in response.results:
        assert result.evaluated == 60  # the usual metrics count the in-scope texts
        assert sum(m.support for m in result.labels) == 60
        assert "" not in {m.label for m in result.labels}
        metrics = result.out_of_scope
        assert (metrics.out_of_scope_texts, metrics.in_scope_texts) == (40, 60)
        # Not fitted yet: the rule apply_best would fit, at the default target.
        assert metrics.threshold.target_coverage == pytest.approx(0.98)
        assert metrics.threshold.dimension == 64
        assert metrics.auroc > 0.9
        assert 0.0 <= metrics.top_similarity_auroc <= 1.0
        assert metrics.recall > 0.5
        assert metrics.in_scope_coverage > 0.8
        assert metrics.in_scope_accuracy <= metrics.in_scope_coverage
        assert result.accuracy == pytest.approx(metrics.in_scope_accuracy)
    assert not response.unknown_labels
    assert not response.classifier.HasField("out_of_scope_threshold")


def test_evaluate_without_out_of_scope_texts_reports_no_out_of_scope_metrics(
    topics: Client,
) -> None:
    response = topics.evaluate("topics", held_out=topical_texts(30, seed=1))
    assert not response.results[0].HasField("out_of_scope")


def test_out_of_scope_texts_must_have_no_label_and_not_be_all(topics: Client) -> None:
    labelled = pb.LabelledText(text="weather rain", label="sport", out_of_scope=True)
    request = pb.EvaluateRequest(classifier="topics", held_out_texts=[labelled])
    with pytest.raises(grpc.RpcError) as raised:
        topics._stub.Evaluate(request)  # the client cannot build it: the raw stub can
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "marked out_of_scope but has label" in str(raised.value.details())
    with pytest.raises(InvalidArgumentError, match="every held-out text is marked out of scope"):
        topics.evaluate("topics", out_of_scope=foreign_texts(3, seed=2))
    with pytest.raises(InvalidArgumentError, match="target_coverage needs apply_best"):
        topics.evaluate("topics", target_coverage=0.9)
    with pytest.raises(InvalidArgumentError, match="target_coverage"):
        topics.evaluate("topics", apply_best=True, target_coverage=0.2)


def test_apply_best_fits_the_threshold_and_classify_answers_out_of_scope(
    topics: Client,
) -> None:
    response = topics.evaluate("topics", apply_best=True, target_coverage=0.9)
    fitted = response.classifier.out_of_scope_threshold
    assert fitted.target_coverage == pytest.approx(0.9)
    assert fitted.coverage >= 0.9
    assert fitted.dimension == 64
    assert topics.get_classifier("topics").out_of_scope_threshold == fitted

    far = topics.classify("topics", FAR_TEXT)
    assert far.unknown
    assert far.unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    assert far.out_of_scope.score < far.out_of_scope.threshold == fitted.threshold
    assert far.out_of_scope.target_coverage == pytest.approx(0.9)
    assert far.scores  # the vote is still shown

    text, label = topical_texts(3, seed=5)[0]
    near = topics.classify("topics", text)
    assert (near.unknown, near.label) == (False, label)
    assert near.out_of_scope.score >= near.out_of_scope.threshold

    # Another dimension has no fitted rule: no check, no out-of-scope answer.
    other = topics.classify("topics", FAR_TEXT, dimension=16)
    assert not other.HasField("out_of_scope")
    assert other.unknown_reason != pb.UNKNOWN_REASON_OUT_OF_SCOPE

    # Held-out Evaluate applies the fitted rule, so it measures what Classify answers.
    measured = topics.evaluate(
        "topics", held_out=topical_texts(30, seed=1), out_of_scope=[FAR_TEXT]
    )
    assert measured.results[0].out_of_scope.threshold == fitted
    assert measured.results[0].out_of_scope.recall == 1.0


def test_too_few_exemplars_for_the_target_coverage_keep_every_text(client: Client) -> None:
    """20 exemplars cannot keep a 98 % promise with a threshold: a new in-scope text falls under
    the lowest of 20 leave-one-out scores with chance 1 / 21, about 5 %. The rule then keeps every
    text (before: its threshold was the lowest score, and a far text was answered unknown), and
    still scores held-out texts for Evaluate's out-of-scope AUROC."""
    client.create_classifier("few", k=5)
    client.add_exemplars("few", topical_texts(20, seed=0))
    fitted = client.evaluate("few", apply_best=True).classifier.out_of_scope_threshold
    assert fitted.target_coverage == pytest.approx(0.98)
    assert fitted.coverage == 1.0
    far = client.classify("few", FAR_TEXT)
    assert far.unknown_reason != pb.UNKNOWN_REASON_OUT_OF_SCOPE
    assert far.out_of_scope.threshold == fitted.threshold <= far.out_of_scope.score
    held_out = client.evaluate("few", held_out=topical_texts(30, seed=1), out_of_scope=[FAR_TEXT])
    assert held_out.results[0].out_of_scope.recall == 0.0
    assert held_out.results[0].out_of_scope.auroc > 0.9
    # 0.95 is within reach of 20: the lowest of the 20 scores (a new text under it: 1 / 21).
    reached = client.evaluate("few", apply_best=True, target_coverage=0.95).classifier
    assert reached.out_of_scope_threshold.coverage == 1.0
    assert reached.out_of_scope_threshold.threshold > fitted.threshold
    assert client.classify("few", FAR_TEXT).unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE


@pytest.fixture
def twins(client: Client) -> Client:
    """ "card" and "loan" share one vocabulary: their texts are in scope but cannot be told
    apart."""
    rng = random.Random(0)
    rows = [(texts_of(TOPICS[topic], rng), label) for _ in range(40) for topic, label in
            (("money", "card"), ("money", "loan"), ("sport", "sport"))]  # fmt: skip
    client.create_classifier("twins", k=10, voting="softmax")
    client.add_exemplars("twins", rows)
    return client


def test_an_in_scope_text_under_min_confidence_is_ambiguous_with_two_candidates(
    twins: Client,
) -> None:
    client = twins
    client.evaluate("twins", apply_best=True, target_coverage=0.9)
    text = texts_of(TOPICS["money"], random.Random(7))
    answer = client.classify("twins", text, min_confidence=0.9)
    assert answer.out_of_scope.score >= answer.out_of_scope.threshold
    assert answer.unknown_reason == pb.UNKNOWN_REASON_AMBIGUOUS
    assert list(answer.candidates) == [s.label for s in answer.scores[:2]]
    assert set(answer.candidates) == {"card", "loan"}
    # Sure enough for a lower bar: answered, and no candidates.
    sure = client.classify("twins", text, min_confidence=0.0)
    assert sure.label in {"card", "loan"}
    assert not sure.candidates


def test_without_an_out_of_scope_rule_low_confidence_stays_below_min_confidence(
    twins: Client,
) -> None:
    text = texts_of(TOPICS["money"], random.Random(7))
    answer = twins.classify("twins", text, min_confidence=0.9)
    assert answer.unknown_reason == pb.UNKNOWN_REASON_BELOW_MIN_CONFIDENCE
    assert not answer.HasField("out_of_scope")
    assert not answer.candidates


def test_mixture_voting_end_to_end(client: Client) -> None:
    client.create_classifier("mixed", k=10, voting="mixture")
    client.add_exemplars("mixed", topical_texts(150, seed=0))
    text, label = topical_texts(3, seed=5)[0]
    assert client.classify("mixed", text).label == label

    response = client.evaluate(
        "mixed", voting=["mixture", "softmax", "discriminant"], apply_best=True
    )
    by_voting = {r.voting: r for r in response.results}
    assert set(by_voting) == {pb.VOTING_MIXTURE, pb.VOTING_SOFTMAX, pb.VOTING_DISCRIMINANT}
    assert by_voting[pb.VOTING_MIXTURE].accuracy > 0.6
    held_out = topical_texts(60, seed=1)
    measured = client.evaluate("mixed", held_out=held_out, voting=["mixture"])
    assert measured.results[0].voting == pb.VOTING_MIXTURE
    assert measured.results[0].accuracy > 0.6
    assert client.classify("mixed", text, voting="mixture").label == label


def test_mixture_vote_mixes_neighbour_and_label_model_shares() -> None:
    neighbours = [Neighbour("a", "x", "", 0.9), Neighbour("b", "y", "", 0.9)]
    answer = vote(
        neighbours,
        Voting.MIXTURE,
        temperature=0.05,
        label_scores=[("x", 0.0), ("y", -1.0), ("z", -1.0)],
        label_temperature=1 / np.log(2),  # shares of exp(score * ln 2): 2:1:1
    )
    shares = dict(answer.scores)
    weight = MIXTURE_WEIGHT
    assert shares["x"] == pytest.approx(weight * 0.5 + (1 - weight) * 0.5)
    assert shares["y"] == pytest.approx(weight * 0.5 + (1 - weight) * 0.25)
    assert shares["z"] == pytest.approx((1 - weight) * 0.25)
    assert answer.label == "x"


def test_judged_applies_out_of_scope_before_ambiguity() -> None:
    neighbours = [Neighbour("a", "x", "", 0.9), Neighbour("b", "y", "", 0.8)]
    unsure = vote(neighbours, Voting.MAJORITY, min_confidence=0.9)
    assert unsure.unknown_reason is UnknownReason.BELOW_MIN_CONFIDENCE
    out = out_of_scope.judged(unsure, ScopeCheck(-5.0, -3.0, 0.98))
    assert (out.label, out.unknown_reason) == (None, UnknownReason.OUT_OF_SCOPE)
    ambiguous = out_of_scope.judged(unsure, ScopeCheck(-1.0, -3.0, 0.98))
    assert ambiguous.unknown_reason is UnknownReason.AMBIGUOUS
    assert ambiguous.candidates == ["x", "y"]
    sure = vote(neighbours, Voting.MAJORITY)
    kept = out_of_scope.judged(sure, ScopeCheck(-1.0, -3.0, 0.98))
    assert (kept.label, kept.unknown_reason, kept.candidates) == ("x", None, [])


def test_auroc_counts_ties_as_half() -> None:
    assert out_of_scope.auroc([3, 4], [1, 2]) == 1.0
    assert out_of_scope.auroc([1, 2], [3, 4]) == 0.0
    assert out_of_scope.auroc([1, 3], [1, 2]) == pytest.approx((0.5 + 0 + 1 + 1) / 4)
    rng = np.random.default_rng(0)
    inside, outside = rng.integers(0, 20, 300), rng.integers(-5, 15, 70)  # many ties
    expected = roc_auc_score([1] * 300 + [0] * 70, np.concatenate([inside, outside]))
    assert out_of_scope.auroc(inside, outside) == pytest.approx(expected, rel=1e-12)


def test_the_fitted_rule_survives_the_classifier_record() -> None:
    rule = OutOfScopeFit(64, 0.95, -3.5, 0.951, (0.1, 0.2), (-1.0, 2.0), (0.5, 1.0), 4000)
    config = ClassifierConfig(
        "c", "", 5, Voting.MIXTURE, -1.0, 0.0, 0.0, 0.05, out_of_scope=rule, label_temperature=0.3
    )
    assert ClassifierConfig.from_payload(config.to_payload()) == config


def test_a_rule_stored_before_the_agreement_scores_as_it_was_fitted() -> None:
    """A record written before the neighbour agreement joined the score has no references for
    it: its threshold was fitted on the other two, and the agreement must not move the score."""
    payload = OutOfScopeFit(64, 0.95, -3.5, 0.951, (0.1, 0.2), (-1.0, 2.0)).to_payload()
    del payload["agreement"]
    rule = OutOfScopeFit.from_payload(payload)
    assert rule.agreement == ()
    both = rule.combination().scores([0.15], [0.0], [0.1])
    np.testing.assert_allclose(both, [np.log(2 / 3) + np.log(2 / 3)])


def test_a_rule_stored_before_interpolation_counts_among_its_references() -> None:
    """A record without reference_size was fitted on p-values counted among its quantiles: it
    must still score so; with the size, between the quantiles, at the size's resolution."""
    rule = OutOfScopeFit(64, 0.98, -6.0, 0.98, (0.0, 1.0, 2.0), (0.0, 1.0, 2.0), (0.5, 1.0, 1.0))
    payload = rule.to_payload()
    del payload["reference_size"]
    older = OutOfScopeFit.from_payload(payload)
    assert older == rule
    assert older.reference_size == 0
    score = older.combination().scores([0.5], [1.5], [0.5])  # 1, 2 and 1 of the 3 at or below
    np.testing.assert_allclose(score, [np.log(2 / 4) + np.log(3 / 4) + np.log(2 / 4)])
    # The same quantiles of 201 scores (0, 100, 200th): 51 and 151 of them at or below 0.5 and
    # 1.5 (interpolated), one at or below 0.5 agreement.
    sized = dataclasses.replace(rule, reference_size=201).combination().scores([0.5], [1.5], [0.5])
    np.testing.assert_allclose(sized, [np.log(52 / 202) + np.log(152 / 202) + np.log(2 / 202)])


def test_a_fit_of_many_exemplars_interpolates_its_quantiles_as_it_scores() -> None:
    """More leave-one-out exemplars than reference points: the rule keeps quantiles and their
    number, and its threshold keeps the target share of the exemplars' scores as Classify
    computes them from the stored rule (fit and check count p-values the same way)."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 16))
    labels = [f"l{i % 6}" for i in range(400)]
    vectors = centres[[i % 6 for i in range(400)]] + 0.8 * rng.normal(size=(400, 16))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    rows = np.arange(400)
    rule = out_of_scope.fit(labels, vectors, rows, 16, 0.9)
    assert rule is not None
    assert rule.reference_size == 400
    assert len(rule.similarity) == len(rule.mahalanobis) == out_of_scope.REFERENCE_POINTS
    loo = open_set.leave_one_out(labels, vectors, rows)
    scores = (
        OutOfScopeFit.from_payload(rule.to_payload())
        .combination()
        .scores(loo.similarity, loo.mahalanobis, loo.agreement)
    )
    assert np.mean(scores >= rule.threshold) == rule.coverage >= 0.9
    # Among all 400 scores, counted here: each p-value within the scores between two quantiles.
    exact = [
        (1 + np.searchsorted(np.sort(s), s, side="right")) / 401
        for s in (loo.similarity, loo.mahalanobis)
    ]
    for reference, score, among_all in zip(
        (rule.similarity, rule.mahalanobis), (loo.similarity, loo.mahalanobis), exact, strict=True
    ):
        interpolated = open_set.p_values(np.asarray(reference), score, 400)
        assert np.abs(interpolated - among_all).max() <= 3 / 401  # 400 / 255 between quantiles


def test_the_scope_check_counts_ten_neighbours_whatever_k_votes(topics: Client) -> None:
    """The score's neighbour agreement is fitted on ten neighbours: Classify with k = 1 must
    look at as many for the check (and vote with one)."""
    topics.evaluate("topics", apply_best=True, target_coverage=0.9)
    texts = [text for text, _ in topical_texts(6, seed=7)] + foreign_texts(6, seed=8)
    ten = [topics.classify("topics", text, k=10) for text in texts]
    one = [topics.classify("topics", text, k=1, include_neighbours=True) for text in texts]
    assert [a.out_of_scope.score for a in one] == pytest.approx([a.out_of_scope.score for a in ten])
    assert all(len(a.neighbours) == 1 for a in one)
    assert len({a.out_of_scope.score for a in ten}) > 2  # the check does tell texts apart
    # Held-out Evaluate, whose neighbours are found for the largest k swept, too; texts with a
    # word of another topic, whose neighbours disagree more often, make the agreement count.
    rng = random.Random(9)
    between = [
        " ".join(
            [*rng.sample(TOPICS["sport"].split(), 2), rng.choice(TOPICS["food"].split()), f"w{i}"]
        )
        for i in range(40)
    ]
    measured = {
        k: topics.evaluate(
            "topics", held_out=topical_texts(20, seed=9), out_of_scope=between, k=[k]
        )
        .results[0]
        .out_of_scope
        for k in (1, 10)
    }
    assert measured[1].auroc == pytest.approx(measured[10].auroc)
    assert measured[1].recall == pytest.approx(measured[10].recall)
    assert measured[1].in_scope_coverage == pytest.approx(measured[10].in_scope_coverage)


async def test_async_client_sends_out_of_scope_texts_and_target_coverage(
    server: ServerThread,
) -> None:
    async with AsyncClient(server.address) as client:
        await client.create_classifier("async-topics", k=5)
        await client.add_exemplars("async-topics", topical_texts(60, seed=0))
        fitted = await client.evaluate("async-topics", apply_best=True, target_coverage=0.95)
        assert fitted.classifier.out_of_scope_threshold.target_coverage == pytest.approx(0.95)
        response = await client.evaluate(
            "async-topics",
            held_out=topical_texts(12, seed=1),
            out_of_scope=foreign_texts(6, seed=2),
        )
        metrics = response.results[0].out_of_scope
        assert (metrics.in_scope_texts, metrics.out_of_scope_texts) == (12, 6)
        assert metrics.threshold == fitted.classifier.out_of_scope_threshold


def test_migrating_to_other_vectors_drops_the_out_of_scope_rule() -> None:
    rule = OutOfScopeFit(16, 0.98, -4.0, 0.98, (0.1,), (1.0,))
    config = ClassifierConfig("c", "", 5, Voting.SOFTMAX, -1.0, 0.0, 0.0, 0.05, out_of_scope=rule)
    assert transfer.carried(config, [16], False, 16)[0].out_of_scope is None
    assert transfer.carried(config, [16], True, 16)[0].out_of_scope == rule
    assert transfer.carried(config, [64], True, 64)[0].out_of_scope is None
