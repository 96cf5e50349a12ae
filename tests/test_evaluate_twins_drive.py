"""Evaluate's leave-one-out without twins drives the choice of the setting, the calibration and
the thresholds by default; EvaluateRequest.leave_out_twins=false gives the plain leave-one-out
back. Checked against a by-hand majority vote over the exemplars (brute force, one exemplar at a
time), through the real server and the fake embedder, whose case and punctuation rewordings
embed identically (exact twins)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from knn_classifier.server import thresholds
from knn_classifier.server.calibration import Calibration
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import EdgeStore

from .conftest import ServerThread
from .fake_embedder import fake_vector
from .test_evaluate_api import topical_texts
from .test_evaluate_twins import reference_twins, with_rewordings

KS = [1, 9]
TARGET_PRECISION = 0.8
"""Evaluate reads it as sent (evaluation_messages.as_sent), not as the 32-bit float on the wire
(0.800000012, which a cut of exactly 80 %, e.g. 67 right of 83, falls short of): fitted by hand
to 0.8 itself, the thresholds equal Evaluate's whether or not such a cut exists, which the
exemplars' order (random per incarnation) decides."""


@dataclass(frozen=True)
class ByHand:
    """Majority votes of every exemplar, in the store's order, at one k."""

    shares: list[float]
    right: list[bool]
    top_similarity: list[float]

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.right))


def by_hand(texts: list[str], labels: list[str], k: int, leave_out_twins: bool) -> ByHand:
    vectors = np.vstack([fake_vector(text, 64) for text in texts])
    everyone = list(range(len(texts)))
    _, found = reference_twins(vectors, labels, everyone)
    shares, right, top = [], [], []
    for i in everyone:
        left_out = found[i] if leave_out_twins else set()
        others = [j for j in everyone if j != i and j not in left_out]
        voters = sorted(others, key=lambda j: -float(vectors[i] @ vectors[j]))[:k]
        counts: dict[str, int] = {}
        for j in voters:
            counts[labels[j]] = counts.get(labels[j], 0) + 1
        best = {
            label: max(float(vectors[i] @ vectors[j]) for j in voters if labels[j] == label)
            for label in counts
        }
        winner = min(counts, key=lambda label: (-counts[label], -best[label], label))
        shares.append(counts[winner] / len(voters))
        right.append(winner == labels[i])
        top.append(float(vectors[i] @ vectors[voters[0]]))
    return ByHand(shares, right, top)


def cross_fitted(votes: ByHand) -> list[float]:
    """Each half's (even and odd positions) shares mapped by a calibration of the other's: the
    halves Evaluate's cross-fit takes (evaluate/choice.py), as ``votes`` is in the store's order,
    which Evaluate reads too."""
    halves = [list(range(0, len(votes.shares), 2)), list(range(1, len(votes.shares), 2))]
    confidences = list(votes.shares)
    for fit_on, apply_to in (halves, halves[::-1]):
        calibration = Calibration.fit(
            [votes.shares[i] for i in fit_on], [votes.right[i] for i in fit_on]
        )
        for i in apply_to:
            confidences[i] = calibration(votes.shares[i])
    return confidences


@pytest.fixture
def served(settings: Settings) -> Iterator[tuple[ServerThread, EdgeStore]]:
    """The server and its store, to read the exemplars in the order Evaluate reads them."""
    store = EdgeStore(settings.data_dir, settings.store.min_free_bytes)
    server = ServerThread(settings, store).start()
    try:
        yield server, store
    finally:
        server.stop()


@pytest.mark.parametrize("leave_out_twins", [None, False])
def test_choice_calibration_and_thresholds_follow_the_votes_without_twins(
    served: tuple[ServerThread, EdgeStore], leave_out_twins: bool | None
) -> None:
    server, store = served
    train = with_rewordings(topical_texts(60, seed=4), every=2)
    with server.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", train)
        records, _ = server.run(store.vectors(64, "c"))
        texts = [str(r.payload["text"]) for r in records]
        labels = [str(r.payload["label"]) for r in records]
        honest = leave_out_twins is None  # unset: twins are left out
        votes = {k: by_hand(texts, labels, k, honest) for k in KS}
        plain = {k: by_hand(texts, labels, k, False) for k in KS}
        without = {k: by_hand(texts, labels, k, True) for k in KS}
        # The data can tell the two apart: they choose different k.
        assert max(KS, key=lambda k: plain[k].accuracy) == 1
        assert max(KS, key=lambda k: without[k].accuracy) == 9

        response = client.evaluate(
            "c",
            k=KS,
            voting=["majority"],
            apply_best=True,
            target_precision=TARGET_PRECISION,
            leave_out_twins=leave_out_twins,
        )

        best = max(KS, key=lambda k: votes[k].accuracy)
        for result in response.results:
            assert result.coverage == pytest.approx(1.0)  # the default thresholds keep all
            assert result.accuracy == pytest.approx(votes[result.k].accuracy)
            assert result.accuracy_with_twins == pytest.approx(plain[result.k].accuracy)
            assert result.accuracy_without_twins == pytest.approx(without[result.k].accuracy)
        assert response.results[0].k == best
        classifier = response.classifier
        assert classifier.k == best
        chosen = votes[best]
        calibration = Calibration.fit(chosen.shares, chosen.right)
        assert list(classifier.calibration.shares) == pytest.approx(calibration.shares)
        assert list(classifier.calibration.probabilities) == pytest.approx(
            calibration.probabilities
        )
        fitted = thresholds.fit(
            chosen.top_similarity, cross_fitted(chosen), chosen.right, TARGET_PRECISION
        )
        assert fitted is not None
        assert response.thresholds.target_met
        assert classifier.min_similarity == pytest.approx(fitted.min_similarity, abs=1e-6)
        assert classifier.min_confidence == pytest.approx(fitted.min_confidence, abs=1e-6)
