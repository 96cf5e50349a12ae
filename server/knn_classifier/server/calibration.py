"""Calibration: a monotone map from the winner's share of the vote to the probability it is right.

Fitted on leave-one-out results (each answer's share and whether its best label was right):
isotonic regression (pool adjacent violators), whose blocks' accuracies are estimated with a
Platt fit as their prior, worth ``PRIOR_ANSWERS`` answers. Platt scaling maps the share's logit
through a sigmoid whose two parameters have a Gaussian prior centred on the identity map.

Why both: isotonic regression follows any monotone shape, but over a few dozen answers its
blocks hold one to three answers and map shares to 0 or 1; Platt fits few points, staying near
the raw share when they are very few, but cannot follow the saturated shares of large
classifiers (many answers at a share of 1.0). With the prior, large blocks keep their own
accuracy and small ones lean on Platt (measured by `make bench-ablations`, docs/accuracy.md).
The map is stored as the points of a piecewise-linear function.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]

_POINTS = 64
"""At most this many points are stored; interpolation fills the gaps."""
_PRIOR_VARIANCE = 0.1
"""Of Platt's slope around 1 and intercept around 0: as strong as about 60 answers' evidence."""
PRIOR_ANSWERS = 20.0
"""How many answers' evidence the Platt fit is worth to each isotonic block."""
_EDGE = 1e-4
"""Shares are clipped to [_EDGE, 1 - _EDGE] before their logit is taken."""
TEMPERATURE_PRIOR = 20.0
"""The prior's weight on (ln T - ln requested)^2 in :func:`fitted_temperature`, in nats: a
Gaussian on ln T with standard deviation 0.16 (the choice: docs/accuracy.md)."""
_LOG_RANGE = 5.0
"""Temperatures are fitted between the requested one times e^-5 and e^5 (1/148 to 148): large
classifiers' label models fit temperatures far below the requested one (docs/accuracy.md)."""


@dataclass(frozen=True, slots=True)
class Calibration:
    shares: tuple[float, ...]
    probabilities: tuple[float, ...]

    def __call__(self, share: float) -> float:
        return float(np.interp(share, self.shares, self.probabilities))

    @classmethod
    def fit(
        cls,
        shares: Sequence[float],
        correct: Sequence[bool],
        prior_answers: float = PRIOR_ANSWERS,
    ) -> Calibration:
        """Isotonic regression of ``correct`` on ``shares``, the Platt fit as each block's prior
        worth ``prior_answers`` answers (0: isotonic regression alone)."""
        x = np.asarray(shares, dtype=np.float64)
        y = np.asarray(correct, dtype=np.float64)
        prior = platt(x, y)
        if len(x) == 0:
            return prior
        mean_shares, hits, counts = _isotonic_blocks(x, y)
        expected = np.interp(mean_shares, prior.shares, prior.probabilities)
        probabilities = (hits + prior_answers * expected) / (counts + prior_answers)
        # Blocks increase in accuracy, but a small block's prior may pull it under its neighbour.
        probabilities = np.maximum.accumulate(probabilities)
        if len(mean_shares) > _POINTS:
            keep = np.unique(np.linspace(0, len(mean_shares) - 1, _POINTS).round().astype(int))
            mean_shares, probabilities = mean_shares[keep], probabilities[keep]
        return cls(tuple(mean_shares.tolist()), tuple(probabilities.tolist()))


def _isotonic_blocks(shares: Array, correct: Array) -> tuple[Array, Array, Array]:
    """Pool adjacent violators: the blocks' mean shares, hits and counts, accuracy increasing.

    Equal shares are pooled first (majority votes take few distinct values), so the map is a
    function.
    """
    distinct, which = np.unique(shares, return_inverse=True)
    hits = np.bincount(which, weights=correct).tolist()
    counts = np.bincount(which).astype(np.float64).tolist()
    share_sums = (distinct * np.asarray(counts)).tolist()
    blocks: list[list[float]] = []  # [hits, share sum, count]
    for block in zip(hits, share_sums, counts, strict=True):
        blocks.append(list(block))
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][2] >= blocks[-1][0] / blocks[-1][2]:
            last = blocks.pop()
            blocks[-1] = [a + b for a, b in zip(blocks[-1], last, strict=True)]
    table = np.asarray(blocks)
    return table[:, 1] / table[:, 2], table[:, 0], table[:, 2]


def platt(shares: Array, correct: Array) -> Calibration:
    """P(right) = sigmoid(a * logit(share) + b), (a, b) the posterior mode under the prior.

    Newton's method with step halving; the log-posterior is concave, so it converges.
    """
    x = _logit(shares)

    def cost(a: float, b: float) -> float:
        z = a * x + b
        penalty = ((a - 1) ** 2 + b**2) / (2 * _PRIOR_VARIANCE)
        return float(np.sum(np.logaddexp(0, z) - correct * z) + penalty)

    a, b = 1.0, 0.0
    for _ in range(100):
        p = _sigmoid(a * x + b)
        gradient = np.array(
            [
                np.sum((p - correct) * x) + (a - 1) / _PRIOR_VARIANCE,
                np.sum(p - correct) + b / _PRIOR_VARIANCE,
            ]
        )
        w = p * (1 - p)
        hessian = np.array(
            [
                [np.sum(w * x * x) + 1 / _PRIOR_VARIANCE, np.sum(w * x)],
                [np.sum(w * x), np.sum(w) + 1 / _PRIOR_VARIANCE],
            ]
        )
        step = np.linalg.solve(hessian, gradient)
        scale = 1.0
        while cost(a - scale * step[0], b - scale * step[1]) > cost(a, b) and scale > 1e-6:
            scale /= 2
        a, b = a - scale * float(step[0]), b - scale * float(step[1])
        if np.max(np.abs(scale * step)) < 1e-9:
            break
    edge = math.log((1 - _EDGE) / _EDGE)
    grid = np.linspace(-edge, edge, _POINTS)
    probabilities = _sigmoid(a * grid + b)
    if a < 0:  # evidence that higher shares are less often right: no monotone map beats a constant
        probabilities = np.full(_POINTS, float(np.mean(correct)) if len(correct) else 0.5)
    return Calibration(tuple(_sigmoid(grid).tolist()), tuple(probabilities.tolist()))


def _logit(shares: Array) -> Array:
    clipped = np.clip(shares, _EDGE, 1 - _EDGE)
    return np.asarray(np.log(clipped / (1 - clipped)))


def _sigmoid(z: Array) -> Array:
    return np.asarray(0.5 * (1 + np.tanh(0.5 * z)))


def fitted_temperature(scores: Array, truth: npt.NDArray[np.intp], requested: float) -> float:
    """The temperature T at which softmax(scores / T) best predicts the labels (row i's is column
    ``truth[i]``): the posterior mode under a Gaussian prior on ln T around ``requested``.

    For label models the temperature changes no answer, only the shares that calibration starts
    from, and the calibration's Platt prior assumes those shares are roughly right; at the
    requested temperature they can be far off, more than the calibration undoes. With few
    answers the prior keeps it near the requested one, where a free fit goes too sharp
    (docs/accuracy.md).
    Rows whose label has no score (-inf: left out of their only exemplar's label) are skipped.
    """
    rows = np.arange(len(truth))
    known = np.isfinite(scores[rows, truth])
    if not known.any():
        return requested
    scored = scores[known]
    margins = scored - scored.max(axis=1, keepdims=True)  # <= 0: exp cannot overflow
    own = margins[np.arange(len(margins)), truth[known]]

    def cost(step: float) -> float:
        """Minus the log posterior of T = requested * e^step, up to a constant."""
        t = requested * math.exp(step)
        likelihood = np.sum(np.log(np.sum(np.exp(margins / t), axis=1)) - own / t)
        return float(likelihood) + TEMPERATURE_PRIOR * step**2

    # In steps of 0.5 over the range, then of 0.05 around the best: the likelihood is convex in
    # 1 / T, so the cost has a single minimum in practice.
    coarse = min(np.linspace(-_LOG_RANGE, _LOG_RANGE, 21), key=cost)
    fine = min(coarse + np.linspace(-0.5, 0.5, 21), key=cost)
    return requested * math.exp(float(fine))
