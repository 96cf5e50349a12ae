from collections.abc import Callable

import numpy as np
import pytest
from sklearn.isotonic import IsotonicRegression

from knn_classifier.server.calibration import Calibration, fitted_temperature, platt


def draws(
    seed: int, n: int, accuracy_of_share: Callable[[np.ndarray], np.ndarray], low: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    shares = rng.uniform(low, 1, n)
    return shares, rng.uniform(0, 1, n) < accuracy_of_share(shares)


def expected_calibration_error(confidences: np.ndarray, correct: np.ndarray) -> float:
    """Over ten equal-width bins of confidence ([0, 0.1), ..., [0.9, 1.0]): each bin's
    |accuracy - mean confidence|, weighted by its share of the answers."""
    error = 0.0
    for low in np.arange(10) / 10:
        inside = (confidences >= low) & ((confidences < low + 0.1) | (low == 0.9))
        if inside.any():
            error += inside.mean() * abs(correct[inside].mean() - confidences[inside].mean())
    return float(error)


def held_out_ece(calibration: Calibration, shares: np.ndarray, correct: np.ndarray) -> float:
    return expected_calibration_error(np.array([calibration(s) for s in shares]), correct)


def test_many_over_confident_shares_are_corrected() -> None:
    shares, correct = draws(3, 5000, lambda s: s**2)
    calibration = Calibration.fit(shares.tolist(), correct.tolist())
    values = [calibration(x) for x in np.linspace(0, 1, 50)]
    assert values == sorted(values)
    assert all(0.0 <= v <= 1.0 for v in values)
    assert calibration(0.5) == pytest.approx(0.25, abs=0.06)
    assert len(calibration.shares) <= 64
    fresh_shares, fresh_correct = draws(4, 5000, lambda s: s**2)
    assert held_out_ece(calibration, fresh_shares, fresh_correct) < 0.03
    assert expected_calibration_error(fresh_shares, fresh_correct) > 0.1


def test_equal_shares_are_pooled() -> None:
    """1-NN majority votes all have a share of 1.0: the map must give their accuracy there."""
    correct = np.arange(1000) % 10 != 0  # 90 % right, misses spread through the order
    shares = np.ones(1000)
    assert Calibration.fit(shares.tolist(), correct.tolist())(1.0) == pytest.approx(0.9, abs=0.01)


def test_without_the_prior_it_is_scikit_learns_isotonic_regression() -> None:
    """Each stored point is a block of scikit-learn's fit (the answers it gives one value, equal
    shares pooled): the block's mean share and its accuracy."""
    rng = np.random.default_rng(8)
    shares = rng.choice(np.linspace(0.3, 1.0, 15), 300)  # repeated shares, as votes give them
    correct = rng.uniform(0, 1, 300) < shares**2
    calibration = Calibration.fit(shares.tolist(), correct.tolist(), prior_answers=0.0)
    fitted = IsotonicRegression().fit(shares, correct.astype(float)).predict(shares)
    values = sorted(set(fitted.tolist()))
    assert 3 < len(values) <= 64  # every block stored, and not a trivial fit
    blocks = [shares[fitted == value].mean() for value in values]
    np.testing.assert_allclose(calibration.shares, blocks, rtol=1e-12)
    np.testing.assert_allclose(calibration.probabilities, values, rtol=1e-12)


def test_few_answers_move_the_raw_share_only_a_little() -> None:
    """Ten right answers do not prove that such shares are always right."""
    shares = np.linspace(0.8, 0.95, 10)
    correct = [True] * 10
    calibration = Calibration.fit(shares.tolist(), correct)
    assert 0.9 < calibration(0.9) < 0.98


def test_saturated_shares_follow_the_data_not_the_prior() -> None:
    """Most shares at 1.0 and a flat accuracy below: a shape Platt's sigmoid cannot follow."""

    def sample(seed: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng(seed)
        shares = np.where(rng.uniform(0, 1, 4000) < 0.6, 1.0, rng.uniform(0.5, 0.99, 4000))
        correct = rng.uniform(0, 1, 4000) < np.where(shares == 1.0, 0.97, 0.4)
        return shares, correct

    shares, correct = sample(5)
    fresh_shares, fresh_correct = sample(6)
    calibration = Calibration.fit(shares.tolist(), correct.tolist())
    platt_ece = held_out_ece(platt(shares, correct.astype(float)), fresh_shares, fresh_correct)
    assert held_out_ece(calibration, fresh_shares, fresh_correct) < 0.015 < 0.03 < platt_ece


def test_platt_recovers_a_logistic_relation() -> None:
    def truth(s: np.ndarray) -> np.ndarray:
        return 1 / (1 + np.exp(-(2 * np.log(s / (1 - s)) - 0.5)))

    shares, correct = draws(7, 20000, truth, low=0.05)
    calibration = platt(shares, correct.astype(float))
    for s in (0.2, 0.5, 0.8, 0.95):
        assert calibration(s) == pytest.approx(float(truth(np.array(s))), abs=0.02)


def test_one_answer_keeps_close_to_the_raw_share() -> None:
    calibration = Calibration.fit([0.7], [True])
    assert 0.7 < calibration(0.7) < 0.8
    assert Calibration.fit([], [])(0.7) == pytest.approx(0.7, abs=1e-3)


def labelled_scores(seed: int, rows: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Scores for 5 labels, and labels drawn from softmax(scores / temperature)."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(0, 0.05, (rows, 5))
    weights = np.exp((scores - scores.max(axis=1, keepdims=True)) / temperature)
    probabilities = weights / weights.sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(5, p=p) for p in probabilities], dtype=np.intp)
    return scores, labels


def test_the_temperature_that_generated_the_labels_is_found() -> None:
    scores, labels = labelled_scores(5, 4000, 0.02)
    assert fitted_temperature(scores, labels, requested=0.05) == pytest.approx(0.02, rel=0.1)


def test_few_answers_keep_the_temperature_near_the_requested_one() -> None:
    scores, labels = labelled_scores(6, 8, 0.02)
    free = fitted_temperature(scores, labels, requested=0.05)
    assert 0.05 / 1.7 < free <= 0.05 * 1.7


def test_labels_without_a_score_are_skipped() -> None:
    scores, labels = labelled_scores(7, 4000, 0.02)
    scores[:10, :] = -np.inf  # as if left out of their label's only exemplar
    scores[:10, 0] = 0.0
    labels[:10] = 1
    assert fitted_temperature(scores, labels, requested=0.05) == pytest.approx(0.02, rel=0.1)
    assert fitted_temperature(scores[:10], labels[:10], requested=0.05) == 0.05
