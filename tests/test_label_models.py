"""Label models: leave-one-out agrees with a reference refitted without the exemplar; what each
one scores."""

import numpy as np
import pytest

from knn_classifier.server import label_models
from knn_classifier.server.voting import Voting

from . import references

# The functions themselves: their optional parameters (noise, checkpoint) are not in the
# service's tables' types.
FIT = {Voting.CENTROID: label_models.centroids, Voting.DISCRIMINANT: label_models.discriminant}
LEAVE_ONE_OUT = {
    Voting.CENTROID: label_models.leave_one_out_centroids,
    Voting.DISCRIMINANT: label_models.leave_one_out_discriminant,
}
REFERENCE = {
    Voting.CENTROID: (references.centroid_noise, references.centroid_scores),
    Voting.DISCRIMINANT: (references.discriminant_noise, references.discriminant_scores),
}


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("voting", [Voting.CENTROID, Voting.DISCRIMINANT])
# More exemplars than dimensions, then fewer.
@pytest.mark.parametrize(("count", "dimension"), [(30, 8), (20, 48)])
def test_leave_one_out_equals_refitting_without_the_exemplar(
    voting: Voting, count: int, dimension: int
) -> None:
    """Against the reference (tests/references.py) refitted on every exemplar but the one left
    out, its noise that of all exemplars."""
    rng = np.random.default_rng(count)
    vectors = unit(rng.standard_normal((count, dimension)))
    labels = [f"l{i % 3}" for i in range(count - 1)] + ["alone"]
    every = np.arange(count)
    names, scores = LEAVE_ONE_OUT[voting](labels, vectors, every)
    assert names == ["alone", "l0", "l1", "l2"]
    reference_noise, reference_scores = REFERENCE[voting]
    noise = reference_noise(labels, vectors)  # leave-one-out keeps all's noise
    assert noise > 0
    assert FIT[voting](labels, vectors).noise == pytest.approx(noise, rel=1e-9)
    for i in every:
        others = every != i
        kept = [labels[j] for j in every[others]]
        refit_labels, refit = reference_scores(kept, vectors[others], vectors[i : i + 1], noise)
        expected = dict(zip(refit_labels, refit[0], strict=True))
        for j, name in enumerate(names):
            if name in expected:
                assert scores[i, j] == pytest.approx(expected[name], rel=1e-5, abs=1e-5)
            else:  # the exemplar was its label's only one
                assert scores[i, j] == -np.inf


def test_centroid_scores_are_cosine_similarities_to_normalised_means() -> None:
    vectors = unit(np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1]]))
    model = label_models.centroids(["a", "a", "b"], vectors, noise=0.0)
    mean = vectors[0] + vectors[1]
    query = unit(np.array([[0.0, 1, 0.5]]))
    expected = [float(query[0] @ mean / np.linalg.norm(mean)), float(query[0] @ vectors[2])]
    np.testing.assert_allclose(model.scores(query)[0], expected, atol=1e-6)


def test_centroids_divide_by_the_mean_length_less_its_noise() -> None:
    vectors = unit(np.array([[1.0, 0, 0], [0.8, 0.6, 0], [0, 0, 1]]))
    model = label_models.centroids(["a", "a", "b"], vectors)
    # The pooled variance: both of a's exemplars are |v0 - v1| / 2 from its mean; b has no spread.
    assert model.noise == pytest.approx(2 * (np.linalg.norm(vectors[0] - vectors[1]) / 2) ** 2)
    mean = (vectors[0] + vectors[1]) / 2
    length = np.sqrt(mean @ mean - model.noise / 2)
    np.testing.assert_allclose(model.weights[:, 0], mean / length, atol=1e-6)
    np.testing.assert_allclose(model.weights[:, 1], vectors[2] / np.sqrt(1 - model.noise))


def test_a_mean_shorter_than_its_noise_keeps_half_its_length() -> None:
    """Two near-opposite exemplars: their mean is shorter than the noise says it should be, and
    the debiased length stops at half the measured one rather than at zero."""
    vectors = unit(np.array([[1.0, 0.1, 0], [-1.0, 0.1, 0], [0, 0, 1]]))
    model = label_models.centroids(["a", "a", "b"], vectors)
    mean = vectors[:2].mean(axis=0)
    assert mean @ mean < model.noise / 2
    np.testing.assert_allclose(model.weights[:, 0], mean / (np.linalg.norm(mean) / 2), atol=1e-5)


@pytest.mark.parametrize("voting", [Voting.CENTROID, Voting.DISCRIMINANT])
def test_scores_do_not_favour_labels_with_more_exemplars(voting: Voting) -> None:
    """Two labels drawn alike, one with 4 exemplars and one with 40: texts from either split
    evenly between them once the means are debiased, and go to the bigger label without it."""
    rng = np.random.default_rng(5)
    centre = unit(rng.standard_normal((1, 32)))[0]

    def draw(count: int) -> np.ndarray:
        return unit(centre + 0.15 * rng.standard_normal((count, 32)))

    small_share: list[float] = []
    biased_share: list[float] = []
    for _ in range(200):
        labels = ["few"] * 4 + ["many"] * 40
        vectors = np.vstack([draw(4), draw(40)])
        queries = draw(20)
        for noise, shares in ((None, small_share), (0.0, biased_share)):
            model = FIT[voting](labels, vectors, noise)
            shares.append(float(np.mean(model.scores(queries).argmax(axis=1) == 0)))
    assert abs(np.mean(small_share) - 0.5) < 0.05
    assert np.mean(biased_share) < 0.3


def test_discriminant_discounts_directions_in_which_labels_vary() -> None:
    """Two labels 0.2 apart along x, each spread widely along y, and one label's mean slightly
    further along y: centroids confuse them, the discriminant discounts y."""
    rng = np.random.default_rng(0)

    def sample(count: int) -> tuple[list[str], np.ndarray]:
        labels = ["left", "right"] * (count // 2)
        x = np.where(np.array(labels) == "left", -0.1, 0.1) + 0.03 * rng.standard_normal(count)
        y = np.where(np.array(labels) == "left", 0.2, 0.0) + 0.2 * rng.standard_normal(count)
        return labels, unit(np.column_stack([x, y, np.full(count, 1.0)]))

    labels, vectors = sample(40)
    test_labels, test_vectors = sample(2000)

    def accuracy(model: label_models.LabelModel) -> float:
        predicted = np.array(model.labels)[model.scores(test_vectors).argmax(axis=1)]
        return float(np.mean(predicted == np.array(test_labels)))

    centroid = accuracy(label_models.centroids(labels, vectors))
    discriminant = accuracy(label_models.discriminant(labels, vectors))
    assert discriminant > 0.95
    assert centroid < 0.88


def test_discriminant_without_scatter_is_nearest_centroid() -> None:
    """One exemplar per label: nothing varies within a label, and unit means rank like cosine."""
    vectors = unit(np.random.default_rng(1).standard_normal((5, 6)))
    labels = list("abcde")
    queries = unit(np.random.default_rng(2).standard_normal((50, 6)))
    discriminant = label_models.discriminant(labels, vectors).scores(queries)
    centroid = label_models.centroids(labels, vectors).scores(queries)
    assert (discriminant.argmax(axis=1) == centroid.argmax(axis=1)).all()


def test_discriminant_leave_one_out_calls_its_checkpoint_as_it_goes() -> None:
    vectors = unit(np.random.default_rng(3).standard_normal((600, 8)))
    labels = [f"l{i % 4}" for i in range(600)]
    calls: list[int] = []
    label_models.leave_one_out_discriminant(
        labels, vectors, np.arange(600), lambda: calls.append(1)
    )
    assert len(calls) == 3  # before rows 0, 256 and 512

    class Stop(Exception):
        pass

    def stop() -> None:
        raise Stop

    with pytest.raises(Stop):
        label_models.leave_one_out_discriminant(labels, vectors, np.arange(600), stop)
