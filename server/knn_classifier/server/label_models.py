"""Label models: each label scored as a whole, from statistics of its exemplars.

Centroid and discriminant voting score a text against every label rather than against its
neighbours. Both are linear in the text, ``score = text @ weights + bias``, fitted in closed form
from the classifier's exemplars (no training step: a write changes the next fit), and both have
an exact leave-one-out form for Evaluate, in which an exemplar is left out of every statistic
that would otherwise contain it.

- **Centroid**: the cosine similarity to the label's centroid (the normalised mean).
- **Discriminant** (linear discriminant analysis with equal label priors): the labels' means
  compared in a space whitened by the exemplars' pooled within-label covariance, shrunk towards
  the identity. Directions along which a label's own exemplars vary count less than directions
  that separate labels, which makes it the more accurate of the two when a label's few
  exemplars vary along directions that do not matter (docs/accuracy.md).

Both are **debiased for the label's exemplar count**. A mean of n noisy exemplars is longer than
the label's true mean: its squared length (Euclidean for the centroid, in C^-1 for the
discriminant) is too large by the noise's (pooled) variance over n. Left alone, that scores a
label with fewer exemplars lower for having fewer: a label just added with 3 exemplars beside
labels with 50, and above all leave-one-out, where the exemplar's own label always has one fewer
than it will when serving. That made leave-one-out underrate label models, misleading both the
choice of method and the calibration fitted from it (docs/accuracy.md). Subtracting the excess
makes the scores estimates of what the label's true mean gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .vectors import Matrix
from .voting import Voting

_Float = npt.NDArray[np.float64]

CHECKPOINT_ROWS = 256
"""Leave-one-out rows between checkpoints: about a second at 2,560 dimensions."""
NOISE_ROWS = 2_000
"""At most this many exemplars measure the discriminant's noise (:func:`discriminant_noise`):
each costs a product with the scatter's basis, a large part of the fit when all are measured,
and a sample estimates the noise closely enough for a correction (noise / n) that is itself tiny
next to a score (docs/accuracy.md)."""


@dataclass(frozen=True, slots=True)
class LabelModel:
    labels: list[str]
    """Sorted."""
    weights: Matrix
    """One column per label."""
    bias: Matrix
    noise: float
    """The pooled noise the means' lengths were debiased by: a mean of n exemplars has its
    squared length lowered by noise / n."""

    def scores(self, texts: Matrix) -> Matrix:
        """Each text's score for each label (one row per text)."""
        scores: Matrix = (texts @ self.weights + self.bias).astype(np.float32)
        return scores


def centroids(labels: Sequence[str], vectors: Matrix, noise: float | None = None) -> LabelModel:
    """Scores are cosine similarities to the labels' centroids: text . mean / |mean|, with
    |mean|^2 debiased by ``noise`` / n (``noise``: the pooled within-label variance, by default
    :func:`centroid_noise` of these exemplars)."""
    names, member = _index(labels)
    counts = np.bincount(member)
    means = _label_sums(member, len(names), vectors) / counts[:, None]
    if noise is None:
        noise = centroid_noise(member, vectors, means)
    lengths = _debiased_lengths(np.einsum("ld,ld->l", means, means), noise / counts)
    weights = (means / lengths[:, None]).T.astype(np.float32)
    return LabelModel(names, weights, np.zeros(len(names), dtype=np.float32), noise)


def centroid_noise(member: npt.NDArray[np.intp], vectors: Matrix, means: _Float) -> float:
    """The pooled within-label variance: squared distances to the label means over n - L."""
    freedom = len(member) - len(means)
    residuals = vectors - means[member]
    return float(np.sum(residuals * residuals)) / freedom if freedom > 0 else 0.0


def _debiased_lengths(squared: _Float, excess: _Float) -> _Float:
    """The lengths of means whose squared lengths ``squared`` are too long by ``excess``; at
    least half the measured length, so noise cannot more than double a label's scores (and 1
    for a zero mean, which scores 0 whatever it is divided by)."""
    lengths = np.sqrt(np.maximum(squared - excess, squared / 4))
    return np.asarray(np.where(lengths == 0, 1, lengths))


def discriminant(labels: Sequence[str], vectors: Matrix, noise: float | None = None) -> LabelModel:
    """Scores are linear discriminants: text . C^-1 mean - (mean . C^-1 mean - noise / n) / 2,
    for each label's mean of n exemplars, with C the pooled within-label covariance scaled to a
    mean variance of 1 and shrunk towards the identity (:func:`shrinkage`), and ``noise`` the
    exemplars' variance in C^-1 (by default :func:`discriminant_noise` of these exemplars)."""
    names, member = _index(labels)
    x = vectors.astype(np.float64)
    counts = np.bincount(member)
    means = _label_sums(member, len(names), vectors) / counts[:, None]
    scatter = Scatter.of(x - means[member])
    freedom = len(x) - len(names)
    if noise is None:
        noise = discriminant_noise(member, x - means[member], scatter, freedom)
    inverse_times_means = scatter.inverse_times(means.T, freedom)
    bias = -0.5 * (np.einsum("dl,dl->l", means.T, inverse_times_means) - noise / counts)
    return LabelModel(names, inverse_times_means.astype(np.float32), bias.astype(np.float32), noise)


def discriminant_noise(
    member: npt.NDArray[np.intp], residuals: _Float, scatter: Scatter, freedom: int
) -> float:
    """tr(C^-1 Sigma), Sigma the within-label covariance: how much noise a mean of n exemplars
    adds to its squared length in C^-1, times n.

    Measured out of sample, from each exemplar's distance in C^-1 to its label's mean without it,
    under the covariance without it (Sherman-Morrison: q / (1 - gamma q), q = r . C^-1 r, up to
    the exemplar's share of the scatter's trace); x n / (n - 1) for that mean's own noise. The
    in-sample tr(C^-1 S) / (n - L) is 1.2-2x too small with few exemplars per label, because S
    is flattest where C^-1 weighs most. Labels with a single exemplar say nothing about it.
    A mean over exemplars, so at most :data:`NOISE_ROWS` of them, evenly spaced, are measured.
    """
    counts = np.bincount(member)[member]
    keep = counts > 1
    if not keep.any() or freedom <= 0:
        return 0.0
    stride = -(-int(keep.sum()) // NOISE_ROWS)
    r, n = residuals[keep][::stride], counts[keep][::stride]
    scale, identity = _scale(scatter.trace, residuals.shape[1], freedom)
    in_basis = r @ scatter.basis
    weight = 1 / (scale * scatter.variances + identity)
    q = (in_basis * in_basis) @ weight + (
        np.einsum("ij,ij->i", r, r) - np.einsum("ij,ij->i", in_basis, in_basis)
    ) / identity
    gamma = scale * n / (n - 1)
    return float(np.mean(n / (n - 1) * q / (1 - gamma * q)))


def leave_one_out_centroids(
    labels: Sequence[str],
    vectors: Matrix,
    self_index: npt.NDArray[np.intp],
    checkpoint: Callable[[], None] = lambda: None,
) -> tuple[list[str], Matrix]:
    """The labels, sorted, and the centroid score of exemplar ``self_index[i]`` (row i) for each
    label, the exemplar left out of its own label's centroid (the pooled noise kept from all
    exemplars); a label it empties gets -inf.

    One vectorised pass: ``checkpoint`` (which may raise to stop the work) is called once.
    """
    checkpoint()
    names, member = _index(labels)
    counts = np.bincount(member)
    sums = _label_sums(member, len(names), vectors)
    means = sums / counts[:, None]
    noise = centroid_noise(member, vectors, means)
    lengths = _debiased_lengths(np.einsum("ld,ld->l", means, means), noise / counts)
    queries = vectors[self_index].astype(np.float64)
    scores = queries @ (means / lengths[:, None]).T
    rows = np.arange(len(self_index))
    own = member[self_index]
    others = np.maximum(counts[own] - 1, 1)  # the exemplar's label without it
    rest = (sums[own] - queries) / others[:, None]
    rest_lengths = _debiased_lengths(np.einsum("ij,ij->i", rest, rest), noise / others)
    own_scores = np.einsum("ij,ij->i", queries, rest) / rest_lengths
    scores[rows, own] = np.where(counts[own] > 1, own_scores, -np.inf)
    return names, scores.astype(np.float32)


def leave_one_out_discriminant(
    labels: Sequence[str],
    vectors: Matrix,
    self_index: npt.NDArray[np.intp],
    checkpoint: Callable[[], None] = lambda: None,
) -> tuple[list[str], Matrix]:
    """The labels, sorted, and the discriminant score of exemplar ``self_index[i]`` (row i) for
    each label, from the model fitted on every exemplar but it (its noise in C^-1 kept from all
    exemplars); a label it empties gets -inf.
    ``checkpoint`` (which may raise to stop the work) is called before every
    :data:`CHECKPOINT_ROWS` rows.

    Exact without refitting: leaving exemplar x (label c, n_c exemplars, residual r = x - mean_c)
    out moves mean_c by -r / (n_c - 1) and takes n_c / (n_c - 1) r r^T from the scatter, a rank-one
    change inverted by the Sherman-Morrison formula in the scatter's eigenbasis.
    """
    names, member = _index(labels)
    x = vectors.astype(np.float64)
    counts = np.bincount(member)
    means = _label_sums(member, len(names), vectors) / counts[:, None]
    scatter = Scatter.of(x - means[member])
    noise = discriminant_noise(member, x - means[member], scatter, len(x) - len(names))
    means_in_basis = means @ scatter.basis
    points_in_basis = x[self_index] @ scatter.basis  # one product, not one per exemplar
    scores = np.empty((len(self_index), len(names)))
    for row, i in enumerate(self_index.tolist()):
        if row % CHECKPOINT_ROWS == 0:
            checkpoint()
        point = (x[i], points_in_basis[row])
        scores[row] = _left_out_scores(
            point, int(member[i]), means, means_in_basis, counts, scatter, noise
        )
    return names, scores.astype(np.float32)


def _left_out_scores(
    point: tuple[_Float, _Float],
    own: int,
    means: _Float,
    means_in_basis: _Float,
    counts: npt.NDArray[np.intp],
    scatter: Scatter,
    noise: float,
) -> _Float:
    """The discriminant scores of an exemplar (``point``: it and its coordinates in the scatter's
    basis; label ``own``) from the model without it, debiased by ``noise`` (of all exemplars)."""
    n_own = int(counts[own])
    residual = (point[0] - means[own], point[1] - means_in_basis[own])
    removed = n_own / (n_own - 1) if n_own > 1 else 0.0  # a lone exemplar is its own mean
    # Without the exemplar: one exemplar fewer, and one label fewer if it was its label's only one.
    freedom = int(counts.sum()) - 1 - (len(counts) - (n_own == 1))
    scale, identity = _scale(
        scatter.trace - removed * float(residual[0] @ residual[0]), len(point[0]), freedom
    )
    weight = 1 / (scale * scatter.variances + identity)  # of each basis direction
    label_means, label_means_in_basis = means.copy(), means_in_basis.copy()
    if n_own > 1:
        label_means[own] -= residual[0] / (n_own - 1)
        label_means_in_basis[own] -= residual[1] / (n_own - 1)
    m, p, r = (label_means, label_means_in_basis), point, residual

    def inner(a: tuple[_Float, _Float], b: tuple[_Float, _Float]) -> _Float:
        """a^T C^-1 b, C the covariance before the rank-one change: by the eigenbasis, and by
        the identity's weight alone outside it (each argument with its coordinates in the basis)."""
        within = (a[1] * weight) @ b[1].T
        return np.asarray(within + (a[0] @ b[0].T - a[1] @ b[1].T) / identity)

    gamma = scale * removed  # C without the exemplar is C - gamma r r^T
    correction = gamma / (1 - gamma * float(inner(r, r)))
    r_means = inner(r, m)
    point_means = inner(p, m) + correction * float(inner(r, p)) * r_means
    means_means = (
        np.einsum("ld,ld->l", m[1] * weight, m[1])
        + (np.einsum("ld,ld->l", m[0], m[0]) - np.einsum("ld,ld->l", m[1], m[1])) / identity
        + correction * r_means**2
    )
    counts_without = counts.copy()
    counts_without[own] = max(n_own - 1, 1)
    scores = point_means - 0.5 * (means_means - noise / counts_without)
    if n_own == 1:
        scores[own] = -np.inf
    return np.asarray(scores)


@dataclass(frozen=True, slots=True)
class Scatter:
    """The pooled within-label scatter (sum of residual outer products) by its eigenvectors."""

    basis: _Float
    """dimension x rank, orthonormal columns."""
    variances: _Float
    """The eigenvalues, all positive."""
    trace: float

    @classmethod
    def of(cls, residuals: _Float) -> Scatter:
        n, d = residuals.shape
        by_gram = n <= d  # the n x n Gram matrix is then the smaller, and the rank is at most n
        gram = residuals @ residuals.T if by_gram else residuals.T @ residuals
        values, vectors = np.linalg.eigh(gram)
        keep = values > max(float(values.max(initial=0.0)), 1e-300) * 1e-10
        values, vectors = values[keep], vectors[:, keep]
        basis = residuals.T @ vectors / np.sqrt(values) if by_gram else vectors
        return cls(basis, values, float(np.sum(residuals * residuals)))

    def inverse_times(self, columns: _Float, freedom: int) -> _Float:
        """C^-1 columns, C as :func:`discriminant` makes it of this scatter with ``freedom``
        degrees of freedom (exemplars less labels)."""
        scale, identity = _scale(self.trace, self.basis.shape[0], freedom)
        weight = 1 / (scale * self.variances + identity)
        in_basis = self.basis.T @ columns
        return np.asarray(
            columns / identity + self.basis @ ((weight - 1 / identity)[:, None] * in_basis)
        )


def shrinkage(dimension: int, freedom: int) -> float:
    """The identity's weight in the discriminant's covariance: d / (d + n - L).

    The posterior mean under an inverse-Wishart prior centred on the identity and worth d
    observations: with few exemplars for the dimension it stays near the centroid method, with
    many it follows the data. A fixed weight does as well on some data sets and worse on others
    (`make bench-ablations`, docs/accuracy.md).
    """
    return dimension / (dimension + freedom)


def _scale(trace: float, dimension: int, freedom: int) -> tuple[float, float]:
    """The factor on the scatter and the identity's weight in C = factor * scatter + weight * I:
    the pooled covariance scaled to a mean variance of 1 and shrunk. Without any scatter, C is
    the identity."""
    if trace <= 0 or freedom <= 0:
        return 0.0, 1.0
    weight = shrinkage(dimension, freedom)
    return (1 - weight) * dimension / trace, weight


FIT: dict[Voting, Callable[[Sequence[str], Matrix], LabelModel]] = {
    Voting.CENTROID: centroids,
    Voting.DISCRIMINANT: discriminant,
    Voting.MIXTURE: discriminant,
}
"""The label model of each voting method that needs one."""
LEAVE_ONE_OUT: dict[
    Voting,
    Callable[
        [Sequence[str], Matrix, npt.NDArray[np.intp], Callable[[], None]],
        tuple[list[str], Matrix],
    ],
] = {
    Voting.CENTROID: leave_one_out_centroids,
    Voting.DISCRIMINANT: leave_one_out_discriminant,
    Voting.MIXTURE: leave_one_out_discriminant,
}


def _index(labels: Sequence[str]) -> tuple[list[str], npt.NDArray[np.intp]]:
    names = sorted(set(labels))
    position = {label: i for i, label in enumerate(names)}
    return names, np.asarray([position[label] for label in labels], dtype=np.intp)


def _label_sums(member: npt.NDArray[np.intp], count: int, vectors: Matrix) -> _Float:
    """Each label's sum of vectors (every label has at least one); rows grouped by label and
    summed in runs, which is many times faster than ``np.add.at``."""
    order = np.argsort(member, kind="stable")
    starts = np.searchsorted(member[order], np.arange(count))
    return np.asarray(np.add.reduceat(vectors[order].astype(np.float64), starts, axis=0))
