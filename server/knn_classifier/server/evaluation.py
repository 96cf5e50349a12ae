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
from .out_of_scope import OutOfScopeFit
from .vectors import Matrix
from .voting import LABEL_SCORED, LABEL_TEMPERATURE, Neighbour, Voting, vote

_BLOCK = 1024


@dataclass(frozen=True, slots=True)
class Setting:
    k: int
    voting: Voting
    dimension: int
    temperature: float
    label_temperature: float = LABEL_TEMPERATURE
    """The discriminant's temperature in mixture voting."""


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
    out_of_scope: OutOfScopeMetrics | None = None
    """With held-out texts marked out of scope; the fields above count the in-scope ones."""


@dataclass(frozen=True, slots=True)
class OutOfScopeMetrics:
    out_of_scope_texts: int
    in_scope_texts: int
    recall: float
    """Share of the out-of-scope texts answered unknown."""
    in_scope_coverage: float
    in_scope_accuracy: float
    auroc: float
    """Of the out-of-scope score, in-scope against out-of-scope texts."""
    top_similarity_auroc: float
    threshold: OutOfScopeFit


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
    for start in range(0, rows, _BLOCK):
        block = scores[start : start + _BLOCK].astype(np.float64)
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
