"""Independent references for the label models, written from their definitions: label by label,
with explicit covariance matrices (scikit-learn's ShrunkCovariance, numpy.linalg) and explicit
refits, never with the service's code, so a test that compares against them can fail.

The service computes the same quantities in closed form: in a scatter's eigenbasis, by the
Sherman-Morrison formula for leave-one-out, with its exemplars grouped by label in one pass.
"""

from __future__ import annotations

import numpy as np
from sklearn.covariance import ShrunkCovariance


def shrinkage(dimension: int, freedom: int) -> float:
    """The identity's weight in the service's shrunk covariances, as its design states it:
    d / (d + n - L) for n exemplars of L labels in d dimensions."""
    return dimension / (dimension + freedom)


def grouped(labels: list[str], vectors: np.ndarray) -> tuple[list[str], list[np.ndarray]]:
    """The labels, sorted, and each one's exemplars (float64 rows)."""
    names = sorted(set(labels))
    x = vectors.astype(np.float64)
    return names, [x[[label == name for label in labels]] for name in names]


def centroid_noise(labels: list[str], vectors: np.ndarray) -> float:
    """The pooled within-label variance: squared distances to the label means over n - L."""
    names, groups = grouped(labels, vectors)
    squares = sum(float(np.sum((g - g.mean(axis=0)) ** 2)) for g in groups)
    return squares / (len(labels) - len(names))


def centroid_scores(
    labels: list[str], vectors: np.ndarray, queries: np.ndarray, noise: float
) -> tuple[list[str], np.ndarray]:
    """The labels, sorted, and each query's cosine to each label's mean, the mean's squared
    length less noise / n (at least a quarter of it)."""
    names, groups = grouped(labels, vectors)
    columns = []
    for g in groups:
        mean = g.mean(axis=0)
        squared = float(mean @ mean)
        length = np.sqrt(max(squared - noise / len(g), squared / 4))
        columns.append(queries.astype(np.float64) @ mean / length)
    return names, np.column_stack(columns)


def discriminant_scores(
    labels: list[str], vectors: np.ndarray, queries: np.ndarray, noise: float
) -> tuple[list[str], np.ndarray]:
    """The labels, sorted, and each query's linear discriminant for each label (equal priors):
    q . P m - (m . P m - noise / n) / 2 for a label's mean m of n exemplars, P the inverse of
    the pooled within-label covariance scaled to a mean variance of 1 and shrunk towards I.

    scikit-learn's ShrunkCovariance divides the scatter by n and shrinks it towards its mean
    variance times I; that is the service's covariance times that mean variance.
    """
    names, groups = grouped(labels, vectors)
    means = np.array([g.mean(axis=0) for g in groups])
    residuals = np.vstack([g - g.mean(axis=0) for g in groups])
    n, d = residuals.shape
    assert n > len(names), "the reference needs some within-label spread"
    covariance = ShrunkCovariance(shrinkage=shrinkage(d, n - len(names)), assume_centered=True)
    covariance.fit(residuals)
    precision = covariance.precision_ * np.trace(covariance.covariance_) / d
    counts = np.array([len(g) for g in groups])
    bias = -0.5 * (np.einsum("ld,de,le->l", means, precision, means) - noise / counts)
    return names, queries.astype(np.float64) @ precision @ means.T + bias


def discriminant_noise(labels: list[str], vectors: np.ndarray) -> float:
    """The noise the discriminant is debiased by, one exemplar at a time: (n - 1) / n times its
    squared distance to its label's mean without it, under the covariance C of every exemplar but
    it (scaled and shrunk as the covariance of all exemplars is), averaged over the exemplars of
    labels with two or more."""
    x = vectors.astype(np.float64)
    n, d = x.shape
    names = sorted(set(labels))
    member = np.array([names.index(label) for label in labels])

    def scatter(rows: np.ndarray) -> np.ndarray:
        """The within-label scatter of ``rows``, each about its label's mean among them."""
        total = np.zeros((d, d))
        for c in set(member[rows].tolist()):
            own = x[rows[member[rows] == c]]
            centred = own - own.mean(axis=0)
            total += centred.T @ centred
        return total

    every = np.arange(n)
    freedom = n - len(names)
    weight = shrinkage(d, freedom)
    scale = (1 - weight) * d / np.trace(scatter(every))
    values = []
    for i in every:
        own = np.flatnonzero(member == member[i])
        if len(own) < 2:
            continue
        others = every[every != i]
        covariance = scale * scatter(others) + weight * np.eye(d)
        away = x[i] - x[own[own != i]].mean(axis=0)
        values.append((len(own) - 1) / len(own) * away @ np.linalg.solve(covariance, away))
    return float(np.mean(values))
