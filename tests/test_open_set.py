"""Out-of-scope scores: relative Mahalanobis against scikit-learn's shrunk covariance, the
label-relative similarity against a loop over the exemplars, the neighbour agreement against
counting, leave-one-out against refitting, the combination and the coverage threshold.
Leave-one-out is checked against references refitted without the exemplar."""

import numpy as np
import pytest
from sklearn.covariance import ShrunkCovariance

from knn_classifier.server import open_set

from .references import shrinkage


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def reference_scores(labels: list[str], vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Relative Mahalanobis scores from scikit-learn's ShrunkCovariance.

    scikit-learn divides a scatter by the number of vectors n; the service's covariances divide
    it by their degrees of freedom (n less the labels' count for the pooled within-label one, n
    - 1 for the background), so its squared distances are scikit-learn's times freedom / n.
    """
    x, q = vectors.astype(np.float64), queries.astype(np.float64)
    names = sorted(set(labels))
    n, d = x.shape
    member = np.array([names.index(label) for label in labels])
    means = np.array([x[member == c].mean(axis=0) for c in range(len(names))])
    freedom = n - len(names)
    within = ShrunkCovariance(shrinkage=shrinkage(d, freedom), assume_centered=True)
    within.fit(x - means[member])
    to_labels = np.column_stack([within.mahalanobis(q - mean) for mean in means]) * freedom / n
    background = ShrunkCovariance(shrinkage=shrinkage(d, n - 1)).fit(x)
    return background.mahalanobis(q) * (n - 1) / n - to_labels.min(axis=1)


# More exemplars than dimensions, then fewer.
@pytest.mark.parametrize(("count", "dimension"), [(60, 8), (20, 48)])
def test_scores_are_relative_mahalanobis_distances(count: int, dimension: int) -> None:
    rng = np.random.default_rng(count)
    vectors = unit(rng.standard_normal((count, dimension)))
    labels = [f"l{i % 4}" for i in range(count)]
    queries = unit(rng.standard_normal((10, dimension)))
    model = open_set.fit(labels, vectors)
    assert model.labels == ["l0", "l1", "l2", "l3"]
    np.testing.assert_allclose(
        model.relative_mahalanobis(queries),
        reference_scores(labels, vectors, queries),
        rtol=1e-6,
        atol=1e-6,
    )


def test_labels_without_spread_are_measured_with_the_identity_over_the_dimension() -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.standard_normal((5, 6)))
    labels = ["a", "b", "c", "d", "e"]  # one exemplar each: no within-label spread
    query = unit(rng.standard_normal((1, 6)))
    background = ShrunkCovariance(shrinkage=shrinkage(6, 4)).fit(vectors.astype(np.float64))
    nearest = min(float(np.sum((query[0] - v) ** 2)) for v in vectors.astype(np.float64))
    expected = background.mahalanobis(query.astype(np.float64))[0] * 4 / 5 - 6 * nearest
    model = open_set.fit(labels, vectors)
    assert model.relative_mahalanobis(query)[0] == pytest.approx(expected, rel=1e-6)


def lower_quartile(values: list[float]) -> float:
    """numpy's default (linear) quantile at 0.25, written out."""
    ordered = sorted(values)
    position = (len(ordered) - 1) / 4
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def reference_similarity(labels: list[str], vectors: np.ndarray, query: np.ndarray) -> float:
    """The query's nearest exemplar's similarity less the typical similarity of that exemplar's
    label: the lower quartile of its exemplars' similarities to their nearest other exemplar."""
    x = vectors.astype(np.float64)
    n = len(x)
    to_query = [float(x[j] @ query.astype(np.float64)) for j in range(n)]
    nearest = max(range(n), key=lambda j: to_query[j])
    own = [
        max(float(x[i] @ x[j]) for j in range(n) if j != i)
        for i in range(n)
        if labels[i] == labels[nearest]
    ]
    return to_query[nearest] - lower_quartile(own)


def test_label_relative_similarity_is_less_the_labels_lower_quartile() -> None:
    """A label's typical similarity: the lower quartile of its exemplars' similarities to their
    nearest other exemplar (of any label)."""
    rng = np.random.default_rng(4)
    vectors = unit(rng.standard_normal((23, 6)))
    labels = [f"l{i % 3}" for i in range(23)]
    similarities = vectors @ vectors.T
    np.fill_diagonal(similarities, -np.inf)
    nearest = similarities.max(axis=1)
    model = open_set.fit(labels, vectors)
    for c, label in enumerate(model.labels):
        own = [float(nearest[i]) for i in range(23) if labels[i] == label]  # 7 or 8 of them
        assert model.typical[c] == pytest.approx(lower_quartile(own), abs=1e-6)
    scores = model.relative_similarity([0.5, 0.9], ["l2", "l0"])
    np.testing.assert_allclose(scores, [0.5 - model.typical[2], 0.9 - model.typical[0]])


@pytest.mark.parametrize(("count", "dimension"), [(30, 8), (20, 48)])
def test_leave_one_out_equals_refitting_without_the_exemplar(count: int, dimension: int) -> None:
    rng = np.random.default_rng(count)
    vectors = unit(rng.standard_normal((count, dimension)))
    # Three labels, one of two exemplars (leaving one out leaves it a single one) and one alone.
    labels = [f"l{i % 2}" for i in range(count - 3)] + ["pair", "pair", "alone"]
    every = np.arange(count)
    left_out = open_set.leave_one_out(labels, vectors, every)
    for i in every:
        others = every[every != i]
        kept = [labels[j] for j in others]
        query = vectors[i : i + 1]
        expected = reference_scores(kept, vectors[others], query)[0]
        assert left_out.mahalanobis[i] == pytest.approx(expected, rel=1e-6, abs=1e-6)
        similarity = reference_similarity(kept, vectors[others], vectors[i])
        assert left_out.similarity[i] == pytest.approx(similarity, abs=1e-6)
        similarities = vectors[others] @ vectors[i]
        ranked = [kept[j] for j in np.argsort(-similarities, kind="stable")]
        agreeing = sum(label == ranked[0] for label in ranked[:10])
        assert left_out.agreement[i] == pytest.approx(agreeing / 10)


def test_leave_one_out_checks_its_checkpoint_before_each_block() -> None:
    rng = np.random.default_rng(2)
    count = open_set.CHECKPOINT_ROWS + 1
    vectors = unit(rng.standard_normal((count, 8)))
    labels = [f"l{i % 3}" for i in range(count)]
    calls: list[int] = []
    open_set.leave_one_out(labels, vectors, np.arange(count), lambda: calls.append(1))
    assert len(calls) == 2

    def stop() -> None:
        raise TimeoutError

    with pytest.raises(TimeoutError):
        open_set.leave_one_out(labels, vectors, np.arange(count), stop)


def test_a_held_out_label_scores_below_the_known_ones() -> None:
    """Four tight clusters on random directions; the model knows three of them."""
    rng = np.random.default_rng(3)
    centres = unit(rng.standard_normal((4, 32)))
    vectors = unit(np.repeat(centres, 40, axis=0) + 0.3 * rng.standard_normal((160, 32)) / 6)
    labels = [f"l{i // 40}" for i in range(160)]
    known = np.array([label != "l3" for label in labels])
    model = open_set.fit(
        [label for label, k in zip(labels, known, strict=True) if k], vectors[known]
    )
    fresh = unit(np.repeat(centres, 10, axis=0) + 0.3 * rng.standard_normal((40, 32)) / 6)
    scores = model.relative_mahalanobis(fresh)
    assert scores[30:].max() < scores[:30].min()
    nearest = np.argmax(fresh @ vectors[known].T, axis=1)
    kept = [label for label, k in zip(labels, known, strict=True) if k]
    similarity = model.relative_similarity(
        (fresh @ vectors[known].T).max(axis=1), [kept[i] for i in nearest]
    )
    assert similarity[30:].max() < similarity[:30].min()


def test_coverage_threshold_keeps_at_least_the_share_asked_for() -> None:
    scores = np.arange(1.0, 101.0)[::-1]  # any order
    assert open_set.coverage_threshold(scores, 0.98) == 3.0  # keeps 98 of 100
    assert open_set.coverage_threshold(scores, 0.95) == 6.0
    assert open_set.coverage_threshold(scores, 0.975) == 3.0  # 97.5 rounds up to 98 kept
    assert open_set.coverage_threshold(scores, 1.0) == 1.0
    assert open_set.coverage_threshold(np.arange(10.0), 0.98) == 0.0  # 9.8 of 10: all kept
    for coverage in (0.5, 0.9, 0.98, 0.999):
        kept = (scores >= open_set.coverage_threshold(scores, coverage)).mean()
        assert coverage <= kept < coverage + 0.01


def test_conformal_threshold_keeps_the_share_asked_for_of_new_texts() -> None:
    scores = np.arange(1.0, 101.0)[::-1]  # any order
    assert open_set.conformal_threshold(scores, 0.98) == 2.0  # floor(0.02 x 101) = 2nd lowest
    assert open_set.conformal_threshold(scores, 0.95) == 5.0
    assert open_set.conformal_threshold(scores, 1.0) is None
    assert open_set.conformal_threshold(np.arange(48.0), 0.98) is None  # 1 / 49 > 2 %
    assert open_set.conformal_threshold(np.arange(49.0), 0.98) == 0.0  # 1 / 50 = 2 %
    # A new text scored like the others falls under it at most 1 - coverage of the time, at any
    # size; coverage_threshold's rejects it 1 / (n + 1) of the time at least.
    rng = np.random.default_rng(0)
    for n, coverage in ((10, 0.9), (20, 0.95), (60, 0.98), (500, 0.98)):
        draws = rng.random((20_000, n + 1))
        scores, new = draws[:, :n], draws[:, n]
        rejected = np.mean(
            [s < (open_set.conformal_threshold(row, coverage) or -np.inf) for row, s in
             zip(scores, new, strict=True)]
        )  # fmt: skip
        assert rejected <= 1 - coverage + 0.005
        assert rejected > 1 - coverage - 0.02  # not wastefully low either


def test_the_combination_sums_the_log_p_values_among_the_references() -> None:
    reference = open_set.LeaveOneOut(
        np.array([4.0, 1, 3, 2]), np.array([10.0, 30, 20, 40]), np.array([1.0, 0.5, 1, 0.9])
    )
    combination = open_set.Combination.of(reference)
    # 2.5: two of the four similarities are at or below it, p = 3 / 5; no Mahalanobis score is
    # at or below 5, p = 1 / 5; agreement 0.5 has one at or below it, p = 2 / 5. 9, 40 and 1 are
    # at or above all four, p = 1.
    np.testing.assert_allclose(
        combination.scores([2.5, 9.0], [5.0, 40.0], [0.5, 1.0]),
        [np.log(3 / 5) + np.log(1 / 5) + np.log(2 / 5), 0.0],
    )
    # A score without references (a rule fitted before it existed) counts for nothing.
    older = open_set.Combination((*combination.references[:2], np.empty(0)))
    np.testing.assert_allclose(older.scores([2.5], [5.0], [0.0]), [np.log(3 / 5) + np.log(1 / 5)])
    with pytest.raises(ValueError, match="2 scores for 3 references"):
        combination.scores([2.5], [5.0])


def test_p_values_between_quantiles_count_at_the_resolution_of_all_the_scores() -> None:
    """References that are quantiles of more scores than they hold: the count of scores at or
    below a text's is read off the quantiles by linear interpolation. The oracle is the count
    among all the scores, computed here directly."""
    # Evenly spaced scores: the quantiles lie on a line and interpolation is exact.
    everything = np.arange(1001.0)
    quantiles = np.quantile(everything, np.linspace(0, 1, 256))
    texts = np.array([-5.0, 0.0, 1.0, 17.0, 500.0, 999.0, 1000.0, 2000.0])
    among_all = (1 + np.array([np.sum(everything <= t) for t in texts])) / (1 + 1001)
    np.testing.assert_allclose(open_set.p_values(quantiles, texts, 1001), among_all)
    combination = open_set.Combination((quantiles,), 1001)
    np.testing.assert_allclose(combination.scores(texts), np.log(among_all))
    # Any scores: within the scores between two neighbouring quantiles, where steps over the
    # quantiles alone are off by up to all of them.
    rng = np.random.default_rng(3)
    scores = np.sort(rng.normal(size=5000))
    quantiles = np.quantile(scores, np.linspace(0, 1, 256))
    texts = np.concatenate([rng.normal(scale=1.5, size=2000), scores[:50], [-9.0, 9.0]])
    counted = np.searchsorted(scores, texts, side="right")
    exact = (1 + counted) / 5001
    interpolated = open_set.p_values(quantiles, texts, 5000)
    between = np.diff(np.searchsorted(scores, quantiles, side="right")).max()
    assert np.abs(interpolated - exact).max() <= between / 5001
    stepped = open_set.p_values(quantiles, texts)
    assert np.abs(interpolated - exact).mean() < np.abs(stepped - exact).mean() / 5
    # Ties, as the agreement has them: at a tied value, at least its leftmost quantile's count.
    tied = np.sort(np.r_[np.full(700, 1.0), rng.choice([0.5, 0.8, 0.9], 300)])
    quantiles = np.quantile(tied, np.linspace(0, 1, 256))
    for value in (0.5, 0.8, 0.9, 1.0):
        p = open_set.p_values(quantiles, [value], 1000)[0]
        assert np.sum(tied < value) / 1001 < p <= (1 + np.sum(tied <= value)) / 1001


def test_references_that_are_the_scores_themselves_count_in_steps() -> None:
    """No size, or a size no larger than the references: the count among the references, as a
    rule fitted before interpolation was fitted (and as any rule of few exemplars is)."""
    reference = np.array([1.0, 2.0, 4.0, 8.0])
    texts = [0.5, 1.0, 3.0, 7.9, 8.0]
    steps = [1 / 5, 2 / 5, 3 / 5, 4 / 5, 1.0]
    for size in (None, 4, 3):
        np.testing.assert_allclose(open_set.p_values(reference, texts, size), steps)
    np.testing.assert_allclose(open_set.p_values(np.empty(0), texts, 10), np.ones(5))


def test_agreement_is_the_share_of_the_nearest_ten_with_the_nearest_label() -> None:
    assert open_set.AGREEMENT_NEIGHBOURS == 10
    rows = [
        ["a"] * 10,
        ["a", "b", "a", "c"] + ["a"] * 6 + ["b"] * 5,  # only the first ten count: 8 of 10
        ["b", "a", "a"],  # fewer than ten neighbours: 1 of 3
        ["x"],
    ]
    np.testing.assert_allclose(open_set.agreement(rows), [1.0, 0.8, 1 / 3, 1.0])
