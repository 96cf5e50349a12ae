import math

import numpy as np
import pytest

from knn_classifier.server import evaluation_messages
from knn_classifier.server.calibration import Calibration
from knn_classifier.server.evaluate import (
    Evaluated,
    Exemplars,
    Outcome,
    Report,
    Setting,
    expected_calibration_error,
    nearest,
    outcomes,
    recommended_first,
    report,
    standard_error,
)
from knn_classifier.server.thresholds import Thresholds, fit, kept
from knn_classifier.server.voting import Neighbour, Voting, vote
from knn_classifier.v1 import classifier_pb2 as pb

SETTING = Setting(3, Voting.MAJORITY, 8, 0.05)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_nearest_matches_a_full_sort() -> None:
    rng = np.random.default_rng(1)
    base = unit(rng.standard_normal((2500, 8)))
    queries = unit(rng.standard_normal((30, 8)))
    indices, sims = nearest(queries, base, 7)
    expected = np.argsort(-(queries @ base.T), axis=1)[:, :7]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(queries @ base.T, expected, axis=1))


def test_leave_one_out_never_finds_itself() -> None:
    rng = np.random.default_rng(2)
    base = unit(rng.standard_normal((1500, 4)))
    self_index = np.array([0, 5, 1499, 700], dtype=np.intp)
    indices, _ = nearest(base[self_index], base, 3, self_index)
    for row, own in zip(indices, self_index, strict=True):
        assert own not in row
    full = np.argsort(-(base[self_index] @ base.T), axis=1)[:, 1:4]
    np.testing.assert_array_equal(indices, full)


def calibrated(share: float) -> float:
    """The calibration below, written out: linear from (0, 0.1) to (0.5, 0.3) to (1, 0.9)."""
    return 0.1 + 0.4 * share if share <= 0.5 else 0.3 + 1.2 * (share - 0.5)


@pytest.mark.parametrize("calibrate", [False, True])
def test_label_scored_outcomes_are_those_of_vote(calibrate: bool) -> None:
    """Centroid and discriminant answers are computed for all rows at once: each as the rule
    written out here gives it (the best score wins, ties to the smaller label, -inf scores left
    out, confidence 1 / sum(exp((score - best) / temperature)), unknown with confidence 0 when
    the nearest neighbour is under min_similarity), and as Classify's ``vote`` gives it."""
    rng = np.random.default_rng(4)
    labels = [f"l{i}" for i in range(6)]
    scores = rng.choice([0.1, 0.2, 0.25, 0.3, -np.inf], size=(300, 6)).astype(np.float32)
    scores[:, 0] = 0.2  # never a row of -inf only
    similarities = np.sort(rng.uniform(0.0, 1.0, (300, 3)).astype(np.float32), axis=1)[:, ::-1]
    indices = np.tile(np.arange(3), (300, 1))
    exemplars = Exemplars(["a", "b", "c"], ["l0", "l1", "l2"], ["x", "y", "z"], unit(np.eye(3)))
    setting = Setting(3, Voting.DISCRIMINANT, 3, 0.07)
    calibration = Calibration((0.0, 0.5, 1.0), (0.1, 0.3, 0.9)) if calibrate else None
    got = outcomes(exemplars, indices, similarities, setting, 0.3, calibration, (labels, scores))
    for row, answer in enumerate(got):
        scored = {lb: s for lb, s in zip(labels, scores[row].tolist(), strict=True) if s > -np.inf}
        best = max(scored.values())
        winner = min(lb for lb, s in scored.items() if s == best)
        share = 1 / sum(math.exp((s - best) / 0.07) for s in scored.values())
        top = float(similarities[row, 0])
        if top < 0.3:
            assert (answer.label, answer.best_label, answer.confidence) == (None, None, 0.0)
        else:
            assert (answer.label, answer.best_label) == (winner, winner)
            assert answer.confidence == pytest.approx(calibrated(share) if calibrate else share)
        assert answer.top_similarity == top
        neighbours = [Neighbour("n", "l0", "t", s) for s in similarities[row].tolist()]
        expected = vote(
            neighbours, setting.voting, 0.3, 0.0, 0.07, calibration, list(scored.items())
        )
        assert (answer.label, answer.best_label) == (expected.label, expected.best_label)
        assert answer.confidence == pytest.approx(expected.confidence, rel=1e-12)
    assert any(a.label is None for a in got)
    assert any(a.label == "l0" for a in got)
    assert any(a.label not in (None, "l0") for a in got)


def test_report_counts_unknown_as_wrong_and_lists_confusions() -> None:
    truth = ["a", "a", "b", "b", "c"]
    outcomes = [
        Outcome("a", "a", 0.9, 0.9),
        Outcome("b", "b", 0.6, 0.8),
        Outcome("b", "b", 0.8, 0.9),
        Outcome(None, "b", 0.3, 0.2),
        Outcome("a", "a", 0.5, 0.5),
    ]
    r = report(SETTING, truth, outcomes)
    assert r.accuracy == pytest.approx(2 / 5)
    assert r.coverage == pytest.approx(4 / 5)
    assert r.accuracy_on_covered == pytest.approx(2 / 4)
    by_label = {m.label: m for m in r.labels}
    assert by_label["a"].precision == pytest.approx(1 / 2)
    assert by_label["a"].recall == pytest.approx(1 / 2)
    assert by_label["b"].precision == pytest.approx(1 / 2)
    assert by_label["c"].f1 == 0.0
    assert r.macro_f1 == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    assert r.confusions == [("a", "b", 1), ("c", "a", 1)]
    assert r.evaluated == 5


def test_expected_calibration_error() -> None:
    assert expected_calibration_error([0.75] * 4, [True, True, True, False]) == pytest.approx(0.0)
    assert expected_calibration_error([0.95] * 2, [True, False]) == pytest.approx(0.45)


def kept_by_hand(
    sims: list[float], conf: list[float], right: list[bool], min_sim: float, min_conf: float
) -> tuple[int, int]:
    """How many answers the thresholds keep, and how many of those are right."""
    keep = [s >= min_sim and c >= min_conf for s, c in zip(sims, conf, strict=True)]
    hits = sum(k and r for k, r in zip(keep, right, strict=True))
    return sum(keep), hits


def test_thresholds_keep_the_most_answers_that_reach_the_target() -> None:
    """Against every pair of thresholds (fewer than 64 distinct similarities: all are tried), the
    precision counted with one right and one wrong answer added."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        n = 60
        sims = rng.uniform(0.2, 0.9, n).round(3).tolist()
        conf = rng.choice([0.3, 0.5, 0.6, 0.7, 0.8, 0.95, 1.0], n).tolist()
        right = (rng.uniform(size=n) < 0.3 + 0.35 * np.array(conf) + 0.3 * np.array(sims)).tolist()
        target = float(rng.choice([0.8, 0.9, 0.95]))
        best = 0
        for s in [-1.0, *sims]:
            for c in [0.0, *conf]:
                count, hits = kept_by_hand(sims, conf, right, s, c)
                if (hits + 1) / (count + 2) >= target:
                    best = max(best, count)
        fitted = fit(sims, conf, right, target)
        if best == 0:
            assert fitted is None
            continue
        assert fitted is not None
        count, hits = kept_by_hand(sims, conf, right, fitted.min_similarity, fitted.min_confidence)
        assert count == best
        assert (hits + 1) / (count + 2) >= target


def test_thresholds_are_fitted_jointly() -> None:
    """Similarity alone cannot reach 0.9 here (its best answers are half wrong) nor confidence
    alone (its best are the dissimilar ones), but the two together keep 40 of 100 answers."""
    sims = [0.9] * 20 + [0.8] * 40 + [0.3] * 40
    conf = [0.5] * 20 + [0.9] * 40 + [0.95] * 40
    right = [True, False] * 10 + [True] * 40 + [True, False] * 20
    fitted = fit(sims, conf, right, 0.9)
    assert fitted == Thresholds(min_similarity=0.8, min_confidence=0.9)
    assert kept(sims, conf, right, fitted) == (1.0, 0.4)


def test_a_target_out_of_reach_fits_nothing() -> None:
    # 12 right of 12 does not show 0.95 (13 / 14 = 0.93), 18 of 18 does.
    lucky = [0.9] * 12 + [0.5] * 88
    assert fit(lucky, lucky, [True] * 12 + [False] * 88, 0.95) is None
    assert fit([0.9] * 18, [0.9] * 18, [True] * 18, 0.95) == Thresholds(-1.0, 0.0)
    assert fit([0.9] * 1000, [0.9] * 1000, [True] * 1000, 1.0) is None


def evaluated(voting: Voting, k: int, right: str) -> Evaluated:
    """A setting's result on texts all labelled "yes", answered right where ``right`` has a 1."""
    setting = Setting(k, voting, 8, 0.05)
    accuracy = right.count("1") / len(right)
    report = Report(setting, accuracy, accuracy, 1.0, accuracy, 0.0, len(right), [], [])
    outcomes = [Outcome("yes" if r == "1" else "no", None, 0.5, 0.5) for r in right]
    return Evaluated(report, outcomes, [])


def yes(n: int) -> list[str]:
    return ["yes"] * n


def test_a_label_model_within_one_standard_error_is_recommended() -> None:
    best = evaluated(Voting.MAJORITY, 1, "1" * 18 + "00")
    runner_up = evaluated(Voting.SOFTMAX, 5, "1" * 17 + "000")
    centroid = evaluated(Voting.CENTROID, 1, "0" + "1" * 17 + "00")  # 0.05 below; 1 SE: 0.077
    assert recommended_first([best, runner_up, centroid], yes(20)) == [centroid, best, runner_up]
    assert recommended_first([best, runner_up], yes(20)) == [best, runner_up]
    # With 2,000 leave-one-out texts one SE is 0.0067: the centroid stays where it was.
    many = evaluated(Voting.MAJORITY, 1, "1" * 1800 + "0" * 200)
    far = evaluated(Voting.CENTROID, 1, "1" * 1700 + "0" * 300)
    assert recommended_first([many, far], yes(2000)) == [many, far]


def test_a_near_perfect_score_keeps_a_standard_error() -> None:
    """19 of 20 against 18: one SE is 0.064 with a hit and a miss added, 0.049 without."""
    best = evaluated(Voting.MAJORITY, 1, "1" * 19 + "0")
    centroid = evaluated(Voting.CENTROID, 1, "1" * 18 + "00")
    assert standard_error(best.report) == pytest.approx(math.sqrt(20 / 22 * 2 / 22 / 20))
    assert recommended_first([best, centroid], yes(20)) == [centroid, best]


def test_the_centroid_unless_the_discriminant_is_right_more_often_on_the_same_texts() -> None:
    centroid = evaluated(Voting.CENTROID, 1, "1" * 300 + "0" * 100)
    # 5 texts more, none fewer: 0.0125 is more than the difference's standard error (0.0055).
    better = evaluated(Voting.DISCRIMINANT, 1, "1" * 305 + "0" * 95)
    assert recommended_first([better, centroid], yes(400)) == [better, centroid]
    # 5 more and 4 fewer: 0.0025 is less than its standard error (0.0075).
    mixed = evaluated(Voting.DISCRIMINANT, 1, "0" * 4 + "1" * 301 + "0" * 95)
    assert recommended_first([mixed, centroid], yes(400)) == [centroid, mixed]
    # The centroid out of reach (0.10 below, one SE 0.077 at n=20): the discriminant.
    best = evaluated(Voting.SOFTMAX, 5, "1" * 18 + "00")
    discriminant = evaluated(Voting.DISCRIMINANT, 1, "1" * 18 + "00")
    far = evaluated(Voting.CENTROID, 1, "1" * 16 + "0000")
    assert recommended_first([best, discriminant, far], yes(20)) == [discriminant, best, far]


def test_evaluate_reads_its_targets_as_sent_not_as_32_bit_floats() -> None:
    """0.8 arrives as 0.800000011920929 (EvaluateRequest.target_precision is a proto float); a
    precision of 68 / 85, exactly 0.8, must meet it."""
    request = pb.EvaluateRequest(classifier="c", target_precision=0.8, target_coverage=0.98)
    assert request.target_precision != 0.8
    read = evaluation_messages.evaluate_request(request)
    assert (read.target_precision, read.target_coverage) == (0.8, 0.98)
    assert read.target_precision is not None
    assert read.target_precision <= 68 / 85
