"""The metrics of a setting's answers: accuracy, per-label precision and recall, calibration,
and how well the out-of-scope texts are told from the others."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .. import out_of_scope
from ..out_of_scope import OutOfScopeFit
from .votes import Outcome, Setting


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
    accuracy_without_twins: float | None = None
    """Leave-one-out only: the accuracy with each exemplar's twins left out with it
    (:mod:`.twins`)."""
    accuracy_with_twins: float | None = None
    """Leave-one-out only: the plain accuracy, each exemplar left out alone."""


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
class Scope:
    """The out-of-scope rule applied to held-out texts in one dimension, and their scores."""

    rule: OutOfScopeFit
    scores: npt.NDArray[np.float64]

    @property
    def kept(self) -> npt.NDArray[np.bool_]:
        return np.asarray(self.scores >= self.rule.threshold)


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


def standard_error(report: Report) -> float:
    """Of ``report``'s accuracy, binomial, with its hits and misses each counted one more (the
    rule of succession): 10 right of 10 is not a certainty."""
    n = max(report.evaluated, 1)
    smoothed = (report.accuracy * n + 1) / (n + 2)
    return math.sqrt(smoothed * (1 - smoothed) / n)


def out_of_scope_metrics(
    labelled: Sequence[str | None], answers: Sequence[Outcome], scope: Scope
) -> OutOfScopeMetrics:
    """How ``answers`` (one per text, ``labelled`` None for an out-of-scope one) tell the
    out-of-scope texts from the others."""
    outside = np.asarray([label is None for label in labelled])
    unknown = np.asarray([a.label is None for a in answers])
    right = np.asarray([a.label == label for a, label in zip(answers, labelled, strict=True)])
    similarities = np.asarray([a.top_similarity for a in answers])
    return OutOfScopeMetrics(
        out_of_scope_texts=int(outside.sum()),
        in_scope_texts=int((~outside).sum()),
        recall=float(unknown[outside].mean()),
        in_scope_coverage=float((~unknown[~outside]).mean()),
        in_scope_accuracy=float(right[~outside].mean()),
        auroc=out_of_scope.auroc(scope.scores[~outside], scope.scores[outside]),
        top_similarity_auroc=out_of_scope.auroc(similarities[~outside], similarities[outside]),
        threshold=scope.rule,
    )


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
