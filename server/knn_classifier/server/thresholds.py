"""min_similarity and min_confidence fitted together to a target precision on leave-one-out answers.

An answer is kept (not "unknown") when its nearest similarity reaches min_similarity and its
confidence reaches min_confidence. The fit keeps as many answers as it can while the kept ones are
right often enough. Fitting each threshold alone to reach the target, then applying both, made
the classifier answer "unknown" to nearly everything whenever one score alone could not reach it.

"Right often enough" counts one more right and one more wrong answer (the rule of succession, as
:func:`evaluate.standard_error` does): 12 right of 12 does not show a precision of 0.95, so the
thresholds cannot be pushed up until a handful of lucky answers remains. A target of 1.0 is
therefore never met.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SIMILARITY_CANDIDATES = 64
"""min_similarity is tried at this many quantiles of the nearest similarities (each with its
best min_confidence), so the fit costs O(n log n + 64 n)."""


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_similarity: float
    min_confidence: float


@dataclass(frozen=True, slots=True)
class Reached:
    """What the thresholds a classifier is left with give on the leave-one-out answers."""

    target_met: bool
    """False: no thresholds reach the target, and the classifier's were left as they were."""
    precision: float
    """Share of the kept answers that are right; 0 when none is kept."""
    coverage: float
    """Share of the answers kept."""


def kept(
    similarities: Sequence[float],
    confidences: Sequence[float],
    correct: Sequence[bool],
    thresholds: Thresholds,
) -> tuple[float, float]:
    """The precision of the answers ``thresholds`` keep (0 when none), and the share they keep."""
    keep = (np.asarray(similarities) >= thresholds.min_similarity) & (
        np.asarray(confidences) >= thresholds.min_confidence
    )
    count = int(keep.sum())
    hits = int((keep & np.asarray(correct, dtype=bool)).sum())
    return (hits / count if count else 0.0), count / max(len(keep), 1)


def fit(
    similarities: Sequence[float],
    confidences: Sequence[float],
    correct: Sequence[bool],
    target: float,
) -> Thresholds | None:
    """The thresholds that keep the most answers whose precision, with one right and one wrong
    answer added, reaches ``target``; the loosest such pair. None when no pair reaches it."""
    if len(confidences) == 0:
        return None
    conf = np.asarray(confidences, dtype=np.float64)
    order = np.argsort(-conf, kind="stable")
    conf = conf[order]
    sims = np.asarray(similarities, dtype=np.float64)[order]
    right = np.asarray(correct, dtype=bool)[order]
    # Where a confidence threshold can cut: after the last answer of each distinct confidence.
    ends = np.flatnonzero(np.append(conf[1:] != conf[:-1], True))
    candidates = np.unique(
        np.quantile(sims, np.linspace(0.0, 1.0, SIMILARITY_CANDIDATES), method="lower")
    )
    best: tuple[int, int] = (0, 0)  # (kept, hits)
    chosen: Thresholds | None = None
    for i, min_similarity in enumerate(candidates):  # loosest first: ties keep the looser
        passing = sims >= min_similarity
        count = np.cumsum(passing)[ends]
        hits = np.cumsum(passing & right)[ends]
        reached = np.flatnonzero((hits + 1) / (count + 2) >= target)
        if len(reached) == 0:
            continue
        j = int(reached[-1])  # the loosest cut: counts only grow as the cuts loosen
        if (int(count[j]), int(hits[j])) <= best:
            continue
        best = (int(count[j]), int(hits[j]))
        chosen = Thresholds(
            min_similarity=-1.0 if i == 0 else float(min_similarity),
            min_confidence=0.0 if j == len(ends) - 1 else float(conf[ends[j]]),
        )
    return chosen
