"""What Classify answers for every evaluated text, from its neighbours and label scores.

Votes come from the same :func:`~knn_classifier.server.voting.vote` that Classify uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..calibration import Calibration
from ..vectors import Matrix
from ..voting import LABEL_SCORED, LABEL_TEMPERATURE, Neighbour, Voting, vote
from .neighbours import BLOCK, Exemplars


@dataclass(frozen=True, slots=True)
class Setting:
    k: int
    voting: Voting
    dimension: int
    temperature: float
    label_temperature: float = LABEL_TEMPERATURE
    """The discriminant's temperature in mixture voting."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one classified text came to: enough to score it, without the neighbours."""

    label: str | None
    """The answer; None for unknown."""
    best_label: str | None
    """The best-scoring label, even when the answer is unknown."""
    confidence: float
    top_similarity: float


def outcomes(
    exemplars: Exemplars,
    indices: npt.NDArray[np.intp],
    similarities: Matrix,
    setting: Setting,
    min_similarity: float = -1.0,
    calibration: Calibration | None = None,
    label_scores: tuple[list[str], Matrix] | None = None,
) -> list[Outcome]:
    """What :func:`~knn_classifier.server.voting.vote` answers (with no min_confidence) for every
    query row, from its first ``setting.k`` neighbours (and, for centroid, discriminant and
    mixture voting, from ``label_scores``: the labels, sorted, and one row of scores per query,
    -inf for a label a query does not score)."""
    if setting.voting in LABEL_SCORED:
        if label_scores is None:
            raise ValueError(f"{setting.voting} voting needs label scores")
        return _label_scored_outcomes(
            similarities, setting, min_similarity, calibration, label_scores
        )
    if setting.voting is Voting.MIXTURE and label_scores is None:
        raise ValueError(f"{setting.voting} voting needs label scores")
    results = []
    for row, (row_indices, row_sims) in enumerate(
        zip(indices[:, : setting.k].tolist(), similarities[:, : setting.k].tolist(), strict=True)
    ):
        neighbours = [
            Neighbour(exemplars.ids[i], exemplars.labels[i], exemplars.texts[i], s)
            for i, s in zip(row_indices, row_sims, strict=True)
            if s > -np.inf  # past the exemplars left when twins are left out
        ]
        by_label: list[tuple[str, float]] = []
        if label_scores is not None and setting.voting is Voting.MIXTURE:
            labels, scores = label_scores
            by_label = [
                (label, score)
                for label, score in zip(labels, scores[row].tolist(), strict=True)
                if score > -np.inf
            ]
        result = vote(
            neighbours,
            setting.voting,
            min_similarity,
            0.0,
            setting.temperature,
            calibration,
            by_label,
            setting.label_temperature,
        )
        results.append(
            Outcome(result.label, result.best_label, result.confidence, result.top_similarity)
        )
    return results


def _label_scored_outcomes(
    similarities: Matrix,
    setting: Setting,
    min_similarity: float,
    calibration: Calibration | None,
    label_scores: tuple[list[str], Matrix],
) -> list[Outcome]:
    """:func:`outcomes` for centroid and discriminant voting, vectorised: with thousands of
    labels, voting row by row in Python took minutes and starved the event loop of the GIL.

    As in ``vote``: the winner is the best-scoring label (ties to the smaller label: the labels
    are sorted), its share 1 / sum(exp((score - best) / temperature)), and a text whose nearest
    neighbour is under ``min_similarity`` is unknown, with confidence 0.
    """
    labels, scores = label_scores
    rows = len(scores)
    top = similarities[:, 0].astype(np.float64) if similarities.shape[1] else np.full(rows, -1.0)
    winners = np.empty(rows, dtype=np.intp)
    shares = np.empty(rows)
    for start in range(0, rows, BLOCK):
        block = scores[start : start + BLOCK].astype(np.float64)
        best = block.max(axis=1, keepdims=True)
        winners[start : start + len(block)] = block.argmax(axis=1)
        shares[start : start + len(block)] = 1.0 / np.exp((block - best) / setting.temperature).sum(
            axis=1
        )
    confidences = (
        np.interp(shares, calibration.shares, calibration.probabilities) if calibration else shares
    )
    return [
        Outcome(labels[w], labels[w], c, t) if t >= min_similarity else Outcome(None, None, 0.0, t)
        for w, c, t in zip(winners.tolist(), confidences.tolist(), top.tolist(), strict=True)
    ]
