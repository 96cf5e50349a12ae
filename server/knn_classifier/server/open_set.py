"""Out-of-scope detection: how unlike all of a classifier's labels a text is.

Three scores, each higher for texts more like the classifier's labels, and their combination:

- **Relative Mahalanobis** (Ren et al. 2021, "A simple fix to Mahalanobis distance for improving
  near-OOD detection"): d_0(x) - min over labels c of d_c(x), d_c the squared Mahalanobis
  distance from x to label c's mean under the labels' pooled within-label covariance (Lee et al.
  2018), d_0 the one to the mean of all exemplars under their covariance (the "background"). d_c
  alone is large for any text unlike the exemplars in the directions in which they vary little,
  in scope or not; subtracting d_0 keeps how much better a label explains the text than the
  classifier's texts as a whole do. Both covariances are shrunk towards their mean variance
  times the identity with the discriminant's weight (:func:`label_models.shrinkage`); one
  without any spread (every label a single exemplar) is taken as the identity over the
  dimension, the per-direction variance of random unit vectors.
- **Label-relative similarity**: the nearest exemplar's similarity less the lower quartile of
  its label's exemplars' similarities to their own nearest other exemplar. A label of tight
  paraphrases needs a closer match than a label of varied wordings: one global threshold on the
  similarity is unfair to either.
- **Neighbour agreement** (:func:`agreement`): the share of the text's
  :data:`AGREEMENT_NEIGHBOURS` nearest exemplars that carry the nearest one's label. A text of an
  intent the classifier does not know often lands between the fine-grained intents it does know,
  its nearest exemplars split among them, while an in-scope text's mostly agree.
- **Combined** (:class:`Combination`): each score turned into its p-value among the exemplars'
  leave-one-out scores, the p-values' logarithms summed (Fisher's method): on held-out
  intents and foreign data sets no score wins everywhere, and the combination keeps close
  to the better one (docs/accuracy.md has the measurements).

The threshold for a coverage target ("keep X % of in-scope texts") is a quantile of the
combined scores of the exemplars left out one at a time (:func:`leave_one_out`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .label_models import Scatter, shrinkage
from .vectors import Matrix

_Float = npt.NDArray[np.float64]
_Index = npt.NDArray[np.intp]

CHECKPOINT_ROWS = 256
"""Leave-one-out rows computed between checkpoints (one block of matrix products)."""
AGREEMENT_NEIGHBOURS = 10
"""Nearest exemplars whose labels :func:`agreement` compares."""


def _covariance(trace: _Float, freedom: _Float, dimension: int) -> tuple[_Float, _Float]:
    """(a, b) of the shrunk covariance a * scatter + b * I of scatters of ``trace`` with
    ``freedom`` degrees of freedom (elementwise): (1 - w) scatter / freedom + w (its mean
    variance) I, w the discriminant's shrinkage. Without any spread: I / dimension."""
    spread = (trace > 0) & (freedom > 0)
    f = np.where(spread, freedom, 1.0)
    weight = np.array([shrinkage(dimension, int(each)) for each in f.ravel()]).reshape(f.shape)
    a = np.where(spread, (1 - weight) / f, 0.0)
    b = np.where(spread, weight * trace / (f * dimension), 1.0 / dimension)
    return a, b


@dataclass(frozen=True, slots=True)
class _Gaussians:
    """Means sharing one covariance, and what squared Mahalanobis distances to them need."""

    basis: _Float
    """The covariance's eigenvectors (dimension x rank); outside them it is b * I."""
    weights: _Float
    """The covariance's inverse along each basis direction."""
    outside: float
    """1 / b."""
    precision_means: _Float
    """The covariance's inverse times each mean: dimension x means."""
    means_norms: _Float
    """mean . covariance^-1 mean, for each mean."""

    @classmethod
    def of(cls, means: _Float, scatter: Scatter, freedom: int) -> _Gaussians:
        a, b = (
            float(c)
            for c in _covariance(np.array(scatter.trace), np.array(freedom), means.shape[1])
        )
        weights = 1 / (a * scatter.variances + b)
        in_basis = scatter.basis.T @ means.T
        precision_means = means.T / b + scatter.basis @ ((weights - 1 / b)[:, None] * in_basis)
        norms = np.einsum("dl,dl->l", means.T, precision_means)
        return cls(scatter.basis, weights, 1 / b, precision_means, norms)

    def distances(self, texts: _Float) -> _Float:
        """The squared distance of each text (row) to each mean (column)."""
        in_basis = texts @ self.basis
        own = (in_basis * in_basis) @ self.weights + self.outside * (
            np.einsum("ij,ij->i", texts, texts) - np.einsum("ij,ij->i", in_basis, in_basis)
        )
        distances = own[:, None] - 2 * texts @ self.precision_means + self.means_norms
        return np.asarray(np.maximum(distances, 0.0))


@dataclass(frozen=True, slots=True)
class OutOfScopeModel:
    labels: list[str]
    """Sorted."""
    within: _Gaussians
    """The label means under the pooled within-label covariance."""
    background: _Gaussians
    """The mean of all exemplars under their covariance."""
    typical: _Float
    """Each label's typical similarity: the lower quartile of its exemplars' similarities to
    their nearest other exemplar."""

    def relative_mahalanobis(self, texts: Matrix) -> _Float:
        """Each text's squared distance to the background less the one to its nearest label."""
        x = texts.astype(np.float64)
        return np.asarray(self.background.distances(x)[:, 0] - self.within.distances(x).min(axis=1))

    def relative_similarity(
        self, similarities: npt.ArrayLike, nearest_labels: Sequence[str]
    ) -> _Float:
        """Each text's nearest exemplar's similarity (``similarities``) less the typical
        similarity of that exemplar's label (``nearest_labels``)."""
        position = {label: i for i, label in enumerate(self.labels)}
        columns = np.asarray([position[label] for label in nearest_labels], dtype=np.intp)
        return np.asarray(np.asarray(similarities, dtype=np.float64) - self.typical[columns])


def fit(labels: Sequence[str], vectors: Matrix) -> OutOfScopeModel:
    """The out-of-scope model of a classifier's exemplars: ``vectors`` (unit length, at least two),
    one row per label of ``labels``."""
    names, member, x, means, background = _statistics(labels, vectors)
    within = Scatter.of(x - means[member])
    total = Scatter.of(x - background)
    nearest = _nearest_two(vectors)[1][:, 0]
    return OutOfScopeModel(
        names,
        _Gaussians.of(means, within, len(x) - len(names)),
        _Gaussians.of(background, total, len(x) - 1),
        np.array([_typical(nearest[member == c]) for c in range(len(names))]),
    )


def agreement(neighbour_labels: Sequence[Sequence[str]]) -> _Float:
    """For each text, the labels of its nearest exemplars (nearest first): the share of the first
    :data:`AGREEMENT_NEIGHBOURS` of them carrying the first one's label."""
    shares = []
    for labels in neighbour_labels:
        counted = labels[:AGREEMENT_NEIGHBOURS]
        shares.append(sum(label == counted[0] for label in counted) / len(counted))
    return np.asarray(shares, dtype=np.float64)


@dataclass(frozen=True, slots=True)
class LeaveOneOut:
    """The three scores of exemplars, each from the exemplars without it."""

    similarity: _Float
    mahalanobis: _Float
    agreement: _Float


def leave_one_out(
    labels: Sequence[str],
    vectors: Matrix,
    self_index: _Index,
    checkpoint: Callable[[], None] = lambda: None,
) -> LeaveOneOut:
    """The scores of exemplar ``self_index[i]`` (row i) from the model fitted on every exemplar
    but it (at least three). ``checkpoint`` (which may raise to stop the work) is called before
    every :data:`CHECKPOINT_ROWS` rows.

    Exact without refitting. Relative Mahalanobis: leaving exemplar x (of a label with n
    exemplars, residual r = x - its mean) out moves its label's mean by -r / (n - 1) and takes
    n / (n - 1) r r^T from the scatter, a rank-one change inverted by the Sherman-Morrison formula
    in the scatter's eigenbasis; the same for the background, a single "label" holding every
    exemplar. Label-relative similarity: the exemplars whose nearest other exemplar it was fall
    back to their second nearest, and it leaves its label's quartile. Agreement: its nearest
    other exemplars.
    """
    names, member, x, means, background = _statistics(labels, vectors)
    within = Scatter.of(x - means[member])
    total = Scatter.of(x - background)
    everyone = np.zeros(len(x), dtype=np.intp)
    indices, similarities = _nearest_two(vectors)
    mahalanobis = np.empty(len(self_index))
    similarity = np.empty(len(self_index))
    agreement = np.empty(len(self_index))
    for start in range(0, len(self_index), CHECKPOINT_ROWS):
        checkpoint()
        rows = self_index[start : start + CHECKPOINT_ROWS]
        agreement[start : start + len(rows)] = _left_out_agreement(vectors, rows, member)
        to_labels = _left_out_distances(x, rows, member, means, within, len(x) - len(names))
        to_all = _left_out_distances(x, rows, everyone, background, total, len(x) - 1)
        mahalanobis[start : start + len(rows)] = to_all[:, 0] - to_labels.min(axis=1)
        for row, i in enumerate(rows.tolist(), start):
            nearest = int(indices[i, 0])
            others = np.flatnonzero((member == member[nearest]) & (np.arange(len(x)) != i))
            own_nearest = np.where(
                indices[others, 0] == i, similarities[others, 1], similarities[others, 0]
            )
            similarity[row] = similarities[i, 0] - _typical(own_nearest)
    return LeaveOneOut(similarity, mahalanobis, agreement)


def _left_out_agreement(vectors: Matrix, rows: _Index, member: _Index) -> _Float:
    """:func:`agreement` of exemplars ``rows`` among the other exemplars."""
    block = vectors[rows] @ vectors.T
    block[np.arange(len(rows)), rows] = -np.inf
    count = min(AGREEMENT_NEIGHBOURS, len(vectors) - 1)
    nearest = np.argpartition(-block, count - 1, axis=1)[:, :count]
    first = member[block.argmax(axis=1)]
    return np.asarray((member[nearest] == first[:, None]).mean(axis=1), dtype=np.float64)


def _left_out_distances(
    x: _Float, rows: _Index, member: _Index, means: _Float, scatter: Scatter, freedom: int
) -> _Float:
    """The squared Mahalanobis distances of exemplars ``rows`` to every mean, each from the
    means and the scatter without it (inf to its own label's if it was the label's only one).

    With A = a' S + b' I the shrunk covariance for the scatter's trace less the exemplar's share
    and one degree of freedom less, and g = a' n / (n - 1), the covariance without the exemplar
    is A - g r r^T: u^T (A - g r r^T)^-1 u = u^T A^-1 u + g (u^T A^-1 r)^2 / (1 - g r^T A^-1 r).
    The exemplar is (n / (n - 1)) r from its label's mean without it.
    """
    counts = np.bincount(member, minlength=len(means))
    own = member[rows]
    n = counts[own]
    alone = n == 1  # its label goes with it; the scatter and its freedom stay as they were
    removed = np.where(alone, 0.0, n / np.maximum(n - 1, 1))
    points = x[rows]
    residuals = points - means[own]
    traces = scatter.trace - removed * np.einsum("ij,ij->i", residuals, residuals)
    a, b = _covariance(traces, freedom - np.where(alone, 0.0, 1.0), x.shape[1])
    weights = 1 / (a[:, None] * scatter.variances[None, :] + b[:, None])  # per row
    outside = 1 / b
    p, m, r = points @ scatter.basis, means @ scatter.basis, residuals @ scatter.basis

    def against(u: _Float, u_basis: _Float, v: _Float, v_basis: _Float) -> _Float:
        """u_i^T A_i^-1 v_j, A_i row i's covariance: rows of u against rows of v."""
        return np.asarray(
            (u_basis * weights) @ v_basis.T + outside[:, None] * (u @ v.T - u_basis @ v_basis.T)
        )

    def paired(u: _Float, u_basis: _Float, v: _Float, v_basis: _Float) -> _Float:
        """u_i^T A_i^-1 v_i."""
        return np.asarray(
            np.einsum("ij,ij,ij->i", u_basis, weights, v_basis)
            + outside * (np.einsum("ij,ij->i", u, v) - np.einsum("ij,ij->i", u_basis, v_basis))
        )

    means_means = weights @ (m * m).T + outside[:, None] * (
        np.einsum("ld,ld->l", means, means) - np.einsum("lr,lr->l", m, m)
    )
    distances = paired(points, p, points, p)[:, None] - 2 * against(points, p, means, m)
    distances += means_means
    g = a * removed
    rr = paired(residuals, r, residuals, r)
    denominator = 1 - g * rr
    towards = paired(points, p, residuals, r)[:, None] - against(residuals, r, means, m)
    distances += (g / denominator)[:, None] * towards**2
    distances[np.arange(len(rows)), own] = np.where(alone, np.inf, removed**2 * rr / denominator)
    return np.asarray(np.maximum(distances, 0.0))


@dataclass(frozen=True, slots=True)
class Combination:
    """Fisher's combination of scores, each as its p-value among in-scope reference scores: the
    sum of log p(s) over the scores, p(s) = (1 + how many references are <= s) / (1 +
    references). A score without references (p = 1) counts for nothing.

    References may be evenly spaced quantiles (``numpy.quantile`` at 0, 1 / (m - 1), ..., 1) of
    ``size`` scores rather than the scores themselves: the count of scores at or below s is then
    read off the quantiles by linear interpolation, as they were taken, so that p-values keep a
    resolution of 1 / (size + 1) between the quantiles instead of steps of 1 / (m + 1): in the
    low tail, which decides rejections, a step pools the 1 / (m - 1) of the scores between two
    quantiles (of 5,000 scores in 256 quantiles, a text below all exemplars but one scored like
    one below twenty of them; docs/accuracy.md, "Far out-of-scope texts")."""

    references: tuple[_Float, ...]
    """Each score's reference scores, sorted, or quantiles of ``size`` scores."""
    size: int | None = None
    """How many scores each reference summarises; None (or the references' own length): the
    references are the scores themselves."""

    @classmethod
    def of(cls, reference: LeaveOneOut) -> Combination:
        """The combination of the three scores, in :class:`LeaveOneOut`'s order."""
        scores = (reference.similarity, reference.mahalanobis, reference.agreement)
        return cls(tuple(np.sort(score) for score in scores))

    def scores(self, *scores: npt.ArrayLike) -> _Float:
        """The combined score of each text, ``scores`` in the references' order."""
        if len(scores) != len(self.references):
            raise ValueError(f"{len(scores)} scores for {len(self.references)} references")
        return np.asarray(
            sum(
                np.log(p_values(reference, score, self.size))
                for reference, score in zip(self.references, scores, strict=True)
            )
        )


def p_values(reference: _Float, scores: npt.ArrayLike, size: int | None = None) -> _Float:
    """Each score's p-value among ``reference`` (ascending): (1 + how many reference scores are
    at or below it) / (1 + their number); ``reference`` quantiles of ``size`` scores, if given
    and more than it holds (see :class:`Combination`). 1 for every score if it is empty."""
    s = np.asarray(scores, dtype=np.float64)
    below = np.searchsorted(reference, s, side="right")
    if size is None or size <= len(reference) or len(reference) < 2:
        return np.asarray((1 + below) / (1 + len(reference)))
    last = len(reference) - 1
    left = np.clip(below - 1, 0, last - 1)  # reference[left] <= s < reference[left + 1]
    low, high = reference[left], reference[left + 1]
    between = np.where(high > low, (s - low) / np.where(high > low, high - low, 1.0), 0.0)
    position = (left + np.clip(between, 0.0, 1.0)) * (size - 1) / last  # in the sorted scores
    counted = np.where(below == 0, 0.0, np.where(below > last, size, position + 1))
    return np.asarray((1 + counted) / (1 + size))


def coverage_threshold(scores: npt.ArrayLike, coverage: float) -> float:
    """The highest threshold that keeps at least ``coverage`` of ``scores`` (those at or above
    it), ``scores`` the leave-one-out scores of in-scope texts."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    dropped = int(np.floor((1 - coverage) * len(ordered) + 1e-9))
    return float(ordered[min(dropped, len(ordered) - 1)])


def conformal_threshold(scores: npt.ArrayLike, coverage: float) -> float | None:
    """The highest threshold under which a new in-scope text falls with probability at most
    ``1 - coverage``, ``scores`` the leave-one-out scores of in-scope texts exchangeable with
    it (split conformal): the m-th lowest score, m = floor((1 - coverage)(n + 1)). None when m
    is 0: with so few scores, rejecting even below the lowest one turns away 1 / (n + 1) of new
    texts, more than ``1 - coverage``, so only keeping every text keeps the promise.

    :func:`coverage_threshold` keeps the share of ``scores`` themselves; a new text's score is
    one more draw, which that threshold rejects with probability (dropped + 1) / (n + 1): about
    5 % at 20 scores for any coverage from 0.95 up."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    rejected = int(np.floor((1 - coverage) * (len(ordered) + 1) + 1e-9))
    return float(ordered[rejected - 1]) if rejected > 0 else None


def _statistics(
    labels: Sequence[str], vectors: Matrix
) -> tuple[list[str], _Index, _Float, _Float, _Float]:
    """The sorted labels, each exemplar's label, the vectors, the label means and the mean of
    all (1 x dimension)."""
    names = sorted(set(labels))
    position = {label: i for i, label in enumerate(names)}
    member = np.asarray([position[label] for label in labels], dtype=np.intp)
    x = vectors.astype(np.float64)
    sums = np.zeros((len(names), x.shape[1]))
    np.add.at(sums, member, x)
    means = sums / np.bincount(member)[:, None]
    return names, member, x, means, x.mean(axis=0, keepdims=True)


def _nearest_two(vectors: Matrix) -> tuple[_Index, _Float]:
    """Each vector's two nearest other vectors by cosine similarity (unit vectors), nearest
    first: indices and similarities (-1 where there is no other vector)."""
    indices = np.zeros((len(vectors), 2), dtype=np.intp)
    similarities = np.full((len(vectors), 2), -1.0)
    step = CHECKPOINT_ROWS * 4
    for start in range(0, len(vectors), step):
        block = vectors[start : start + step] @ vectors.T
        rows = np.arange(len(block))
        block[rows, np.arange(start, start + len(block))] = -np.inf
        for column in range(min(2, len(vectors) - 1)):
            best = block.argmax(axis=1)
            indices[start : start + len(block), column] = best
            similarities[start : start + len(block), column] = block[rows, best]
            block[rows, best] = -np.inf
    return indices, similarities


def _typical(nearest_similarities: _Float) -> float:
    """A label's typical similarity, from its exemplars' similarities to their nearest other
    exemplar: their lower quartile."""
    return float(np.quantile(nearest_similarities, 0.25))
