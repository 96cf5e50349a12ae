import math

import numpy as np
import pytest

from knn_classifier.server.evaluation import (
    Outcome,
    Report,
    Setting,
    expected_calibration_error,
    nearest,
    report,
    threshold_for_precision,
)
from knn_classifier.server.evaluator import Evaluated, recommended_first, standard_error
from knn_classifier.server.voting import Voting

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


def test_threshold_for_precision() -> None:
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    correct = [True, True, True, False, False]
    assert threshold_for_precision(scores, correct, 1.0) == pytest.approx(0.7)
    assert threshold_for_precision(scores, correct, 0.75) == pytest.approx(0.6)
    assert threshold_for_precision(scores, correct, 0.5) == -1.0
    assert threshold_for_precision([0.9], [False], 0.9) > 0.9


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
