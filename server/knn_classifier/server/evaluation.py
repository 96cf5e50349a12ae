"""Evaluation of a classifier: neighbours by brute force, votes, and the metrics of the votes.

Leave-one-out classifies every stored exemplar by the others, from the stored vectors; held-out
evaluation classifies labelled texts that are not stored. Both vote with the same
:func:`~knn_classifier.server.voting.vote` that Classify uses, over exact cosine neighbours (the
stores search exactly too), so what Evaluate measures is what Classify answers.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from . import deadlines, label_models
from .calibration import Calibration
from .voting import Neighbour, Vote, Voting, vote

Matrix = npt.NDArray[np.float32]
_BLOCK = 1024


@dataclass(frozen=True, slots=True)
class Setting:
    k: int
    voting: Voting
    dimension: int
    temperature: float


@dataclass(frozen=True, slots=True)
class LabelMetrics:
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True, slots=True)
class Report:
    setting: Setting
    accuracy: float
    """Share of all evaluated texts whose answer is the true label (unknown counts as wrong)."""
    macro_f1: float
    coverage: float
    """Share of texts that got a label rather than unknown."""
    accuracy_on_covered: float
    expected_calibration_error: float
    evaluated: int
    labels: list[LabelMetrics]
    confusions: list[tuple[str, str, int]]
    """(true label, predicted label, count), most frequent first."""


@dataclass(frozen=True, slots=True)
class Exemplars:
    """One classifier's stored exemplars in one dimension."""

    ids: list[str]
    labels: list[str]
    texts: list[str]
    vectors: Matrix


def nearest(
    queries: Matrix, base: Matrix, k: int, self_index: npt.NDArray[np.intp] | None = None
) -> tuple[npt.NDArray[np.intp], Matrix]:
    """Indices and similarities of the ``k`` most similar rows of ``base``, best first.

    With ``self_index`` (leave-one-out), query i is row ``self_index[i]`` of ``base`` and never
    finds itself.
    """
    k = min(k, base.shape[0] - (0 if self_index is None else 1))
    indices = np.empty((queries.shape[0], k), dtype=np.intp)
    similarities = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], _BLOCK):
        block = queries[start : start + _BLOCK] @ base.T
        if self_index is not None:
            rows = np.arange(block.shape[0])
            block[rows, self_index[start : start + block.shape[0]]] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        indices[start : start + block.shape[0]] = np.take_along_axis(top, order, axis=1)
        similarities[start : start + block.shape[0]] = np.take_along_axis(top_sims, order, axis=1)
    return indices, similarities


def label_scores(
    voting: Voting,
    exemplars: Exemplars,
    queries: Matrix,
    self_index: npt.NDArray[np.intp] | None = None,
) -> tuple[list[str], Matrix]:
    """The labels and each query's score for each label under centroid or discriminant voting;
    with ``self_index`` (leave-one-out), exemplar ``self_index[i]`` is query i and is left out
    of every statistic it would be in (:mod:`label_models`), and the call's deadline is checked
    as it goes."""
    if self_index is not None:
        return label_models.LEAVE_ONE_OUT[voting](
            exemplars.labels,
            exemplars.vectors,
            self_index,
            lambda: deadlines.check(f"the next rows of {voting} leave-one-out"),
        )
    model = label_models.FIT[voting](exemplars.labels, exemplars.vectors)
    return model.labels, model.scores(queries)


def votes(
    exemplars: Exemplars,
    indices: npt.NDArray[np.intp],
    similarities: Matrix,
    setting: Setting,
    min_similarity: float = -1.0,
    min_confidence: float = 0.0,
    calibration: Calibration | None = None,
    label_scores: tuple[list[str], Matrix] | None = None,
) -> list[Vote]:
    """The vote for every query row, from its first ``setting.k`` neighbours (and, for centroid
    and discriminant voting, from ``label_scores``: the labels and one row of scores per query,
    -inf for a label a query does not score)."""
    labels, by_label = label_scores or ([], np.empty((len(indices), 0), dtype=np.float32))
    results = []
    for row, (row_indices, row_sims) in enumerate(
        zip(indices[:, : setting.k].tolist(), similarities[:, : setting.k].tolist(), strict=True)
    ):
        neighbours = [
            Neighbour(exemplars.ids[i], exemplars.labels[i], exemplars.texts[i], s)
            for i, s in zip(row_indices, row_sims, strict=True)
        ]
        results.append(
            vote(
                neighbours,
                setting.voting,
                min_similarity,
                min_confidence,
                setting.temperature,
                calibration,
                [
                    (label, score)
                    for label, score in zip(labels, by_label[row].tolist(), strict=True)
                    if score > -np.inf
                ],
            )
        )
    return results


def expected_calibration_error(
    confidences: Sequence[float], correct: Sequence[bool], bins: int = 10
) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their size."""
    conf = np.asarray(confidences, dtype=np.float64)
    hits = np.asarray(correct, dtype=np.float64)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        mask = which == b
        if mask.any():
            error += mask.mean() * abs(hits[mask].mean() - conf[mask].mean())
    return float(error)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one classified text came to: enough to score it, without the neighbours."""

    label: str | None
    """The answer; None for unknown."""
    best_label: str | None
    """The best-scoring label, even when the answer is unknown."""
    confidence: float
    top_similarity: float


def outcome(result: Vote) -> Outcome:
    return Outcome(result.label, result.best_label, result.confidence, result.top_similarity)


def report(setting: Setting, truth: Sequence[str], outcomes: Sequence[Outcome]) -> Report:
    predicted = [o.label for o in outcomes]
    correct = [p == t for p, t in zip(predicted, truth, strict=True)]
    n = len(truth)
    n_covered = sum(p is not None for p in predicted)
    true_counts = Counter(truth)
    predicted_counts = Counter(p for p in predicted if p is not None)
    hit_counts = Counter(t for t, ok in zip(truth, correct, strict=True) if ok)
    per_label = []
    for label in sorted(set(truth) | set(predicted_counts)):
        hits = hit_counts[label]
        precision = hits / predicted_counts[label] if predicted_counts[label] else 0.0
        recall = hits / true_counts[label] if true_counts[label] else 0.0
        f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
        per_label.append(LabelMetrics(label, precision, recall, f1, true_counts[label]))
    with_support = [m for m in per_label if m.support]
    confusions = Counter(
        (t, p) for t, p in zip(truth, predicted, strict=True) if p is not None and p != t
    )
    # Calibration is judged on what every answer claims: its best label's confidence.
    claimed_right = [o.best_label == t for o, t in zip(outcomes, truth, strict=True)]
    return Report(
        setting=setting,
        accuracy=sum(correct) / n,
        macro_f1=sum(m.f1 for m in with_support) / len(with_support),
        coverage=n_covered / n,
        accuracy_on_covered=sum(correct) / n_covered if n_covered else 0.0,
        expected_calibration_error=expected_calibration_error(
            [o.confidence for o in outcomes], claimed_right
        ),
        evaluated=n,
        labels=per_label,
        confusions=[(t, p, c) for (t, p), c in confusions.most_common(10)],
    )
