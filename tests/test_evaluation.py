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
from knn_classifier.server.evaluator import Evaluated, recommended_first
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


def evaluated(voting: Voting, k: int, accuracy: float, n: int) -> Evaluated:
    setting = Setting(k, voting, 8, 0.05)
    return Evaluated(Report(setting, accuracy, accuracy, 1.0, accuracy, 0.0, n, [], []), [], [])


def test_a_centroid_setting_within_one_standard_error_is_recommended() -> None:
    best, runner_up = (
        evaluated(Voting.MAJORITY, 1, 0.90, 20),
        evaluated(Voting.SOFTMAX, 5, 0.85, 20),
    )
    centroid = evaluated(Voting.CENTROID, 1, 0.85, 20)  # 0.05 below; one SE is 0.067 at n=20
    ranked = recommended_first([best, runner_up, centroid])
    assert ranked == [centroid, best, runner_up]
    # With 2,000 leave-one-out texts one SE is 0.0067: the centroid stays where it was.
    many = [evaluated(v, k, a, 2000) for v, k, a in [(Voting.MAJORITY, 1, 0.90)]]
    far = evaluated(Voting.CENTROID, 1, 0.85, 2000)
    assert recommended_first([*many, far]) == [*many, far]
    assert recommended_first([best, runner_up]) == [best, runner_up]


def test_the_simplest_label_model_within_one_standard_error_is_recommended() -> None:
    best = evaluated(Voting.SOFTMAX, 5, 0.90, 20)
    discriminant = evaluated(Voting.DISCRIMINANT, 1, 0.88, 20)
    centroid = evaluated(Voting.CENTROID, 1, 0.86, 20)
    assert recommended_first([best, discriminant, centroid]) == [centroid, best, discriminant]
    # 0.10 below at n=20 is out of reach (one SE is 0.067): the discriminant is the simplest left.
    far = evaluated(Voting.CENTROID, 1, 0.80, 20)
    assert recommended_first([best, discriminant, far]) == [discriminant, best, far]
