"""Out-of-scope answers: :mod:`open_set`'s combined score and its fitted threshold, as the
service uses them.

Three parts with three lifetimes:

- the **model** (:func:`open_set.fit` of a classifier's exemplars in one dimension) is derived
  from the exemplars like a label model, refitted after writes (:func:`model_fit` has the shape
  of a label model's fit, so the same cache serves it);
- the **fit** (:class:`OutOfScopeFit`: the p-value reference, quantiles of the exemplars'
  leave-one-out scores, and the threshold that keeps a target share of them) is made by
  Evaluate with apply_best and stored with the classifier, like the calibration;
- the **check** of a text (:class:`voting.ScopeCheck`) applies both in Classify and in
  Evaluate's held-out mode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from . import open_set
from .voting import ScopeCheck, UnknownReason, Vote

Matrix = npt.NDArray[np.float32]
_Float = npt.NDArray[np.float64]

DEFAULT_TARGET_COVERAGE = 0.98
"""The share of in-scope texts the threshold keeps when Evaluate is given no target_coverage."""
REFERENCE_POINTS = 256
"""The p-value reference of each score is kept as at most this many quantiles of the exemplars'
leave-one-out scores, small enough to store with the classifier's record; p-values interpolate
between them to the resolution of all the scores (:class:`open_set.Combination`)."""
MIN_EXEMPLARS = 3
"""Leave-one-out of the open-set statistics needs at least this many exemplars."""


def model_fit(labels: Sequence[str], vectors: Matrix) -> open_set.OutOfScopeModel | None:
    """The out-of-scope model of a classifier's exemplars in one dimension (derived data, one
    per classifier, dimension and revision); None with fewer than :data:`MIN_EXEMPLARS`."""
    return open_set.fit(labels, vectors) if len(labels) >= MIN_EXEMPLARS else None


@dataclass(frozen=True, slots=True)
class OutOfScopeFit:
    """The out-of-scope rule Evaluate fitted for one dimension of a classifier."""

    dimension: int
    target_coverage: float
    threshold: float
    """Texts scoring under it are out of scope."""
    coverage: float
    """The share of the leave-one-out exemplars the threshold keeps."""
    similarity: tuple[float, ...]
    """The reference label-relative similarities (quantiles, ascending)."""
    mahalanobis: tuple[float, ...]
    """The reference relative Mahalanobis scores (quantiles, ascending)."""
    agreement: tuple[float, ...] = ()
    """The reference neighbour agreements (quantiles, ascending); empty in a rule fitted before
    the score had them, whose threshold was fitted without: the agreement then counts for
    nothing."""
    reference_size: int = 0
    """How many leave-one-out scores the references are quantiles of, between which p-values
    interpolate; 0 in a rule fitted before they did, whose threshold was fitted on p-values
    counted among the quantiles themselves: they still are."""

    def combination(self) -> open_set.Combination:
        return _combination(
            (self.similarity, self.mahalanobis, self.agreement), self.reference_size or None
        )

    def to_payload(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {
            "similarity": list(self.similarity),
            "mahalanobis": list(self.mahalanobis),
            "agreement": list(self.agreement),
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> OutOfScopeFit:
        return cls(
            dimension=int(payload["dimension"]),
            target_coverage=float(payload["target_coverage"]),
            threshold=float(payload["threshold"]),
            coverage=float(payload["coverage"]),
            similarity=tuple(float(s) for s in payload["similarity"]),
            mahalanobis=tuple(float(s) for s in payload["mahalanobis"]),
            agreement=tuple(float(s) for s in payload.get("agreement", ())),
            reference_size=int(payload.get("reference_size", 0)),
        )


def fit(
    labels: Sequence[str],
    vectors: Matrix,
    self_index: npt.NDArray[np.intp],
    dimension: int,
    target_coverage: float,
    checkpoint: Callable[[], None] = lambda: None,
    vetoed: npt.NDArray[np.bool_] | None = None,
) -> OutOfScopeFit | None:
    """The threshold keeping ``target_coverage`` of new in-scope texts, fitted on exemplars
    ``self_index``, each scored by the model of every exemplar but it
    (:func:`open_set.conformal_threshold`); None with fewer than :data:`MIN_EXEMPLARS`
    exemplars. With too few for the target (under 49 at 0.98) no threshold keeps it, and the
    threshold is the lowest score the rule gives: it keeps every text, and its references still
    score texts (Evaluate's out-of-scope AUROC).
    ``checkpoint`` (which may raise to stop the work) is called as :func:`open_set.leave_one_out`
    goes. ``vetoed``: which of them a negative exemplar vetoes (:mod:`negatives`); they count
    as rejected, so the threshold keeps the target share of all of them, vetoed ones included,
    and keeps every other one if the veto alone rejects more than the target allows."""
    if len(labels) < MIN_EXEMPLARS:
        return None
    loo = open_set.leave_one_out(labels, vectors, self_index, checkpoint)
    similarity, mahalanobis = _quantiles(loo.similarity), _quantiles(loo.mahalanobis)
    agreement = _quantiles(loo.agreement)
    size = len(self_index)
    reference = _combination((similarity, mahalanobis, agreement), size)
    scores = reference.scores(loo.similarity, loo.mahalanobis, loo.agreement)
    free = np.ones(len(scores), dtype=bool) if vetoed is None else ~vetoed
    candidates = free if free.any() else ~free  # all vetoed: the threshold is moot
    target = min(1.0, target_coverage * len(scores) / int(candidates.sum()))
    threshold = open_set.conformal_threshold(scores[candidates], target)
    if threshold is None:  # too few for the target: the lowest score there is keeps every text
        threshold = float(reference.scores(*[[-np.inf]] * len(reference.references))[0])
    coverage = float(np.mean(free & (scores >= threshold)))
    return OutOfScopeFit(
        dimension, target_coverage, threshold, coverage, similarity, mahalanobis, agreement, size
    )


def scores(
    model: open_set.OutOfScopeModel,
    rule: OutOfScopeFit,
    queries: Matrix,
    top_similarities: Sequence[float],
    neighbour_labels: Sequence[Sequence[str]],
) -> _Float:
    """Each query's combined score (higher: more in scope), from its nearest exemplar's
    similarity and the labels of its nearest exemplars (nearest first, at least
    :data:`open_set.AGREEMENT_NEIGHBOURS` where the classifier has that many). A nearest label
    the model does not know (written after the model was fitted) scores +inf: in scope, since it
    cannot be judged."""
    known = set(model.labels)
    fallback = model.labels[0]
    nearest_labels = [labels[0] for labels in neighbour_labels]
    labels = [label if label in known else fallback for label in nearest_labels]
    similarity = model.relative_similarity(top_similarities, labels)
    combined = rule.combination().scores(
        similarity, model.relative_mahalanobis(queries), open_set.agreement(neighbour_labels)
    )
    unknown = np.asarray([label not in known for label in nearest_labels], dtype=bool)
    return np.asarray(np.where(unknown, np.inf, combined))


def judged(answer: Vote, check: ScopeCheck) -> Vote:
    """``answer`` with its out-of-scope ``check`` applied: unknown as out of scope under the
    threshold; in scope but under min_confidence with two labels or more, ambiguous."""
    if check.score < check.threshold:
        reason = UnknownReason.OUT_OF_SCOPE
        return dataclasses.replace(answer, label=None, unknown_reason=reason, out_of_scope=check)
    if answer.unknown_reason is UnknownReason.BELOW_MIN_CONFIDENCE and len(answer.scores) > 1:
        reason = UnknownReason.AMBIGUOUS
        return dataclasses.replace(answer, unknown_reason=reason, out_of_scope=check)
    return dataclasses.replace(answer, out_of_scope=check)


def auroc(inside: npt.ArrayLike, outside: npt.ArrayLike) -> float:
    """The probability that an in-scope text scores above an out-of-scope one (ties count half):
    the area under the ROC curve. 0.5 when either side is empty."""
    a, b = np.asarray(inside, dtype=np.float64), np.asarray(outside, dtype=np.float64)
    if not len(a) or not len(b):
        return 0.5
    ordered = np.sort(b)
    below = np.searchsorted(ordered, a, side="left")
    ties = np.searchsorted(ordered, a, side="right") - below
    return float((below + 0.5 * ties).sum() / (len(a) * len(b)))


def _combination(references: Sequence[Sequence[float]], size: int | None) -> open_set.Combination:
    return open_set.Combination(tuple(np.asarray(r, dtype=np.float64) for r in references), size)


def _quantiles(values: _Float) -> tuple[float, ...]:
    ordered = np.sort(values)
    if len(ordered) > REFERENCE_POINTS:
        ordered = np.quantile(ordered, np.linspace(0.0, 1.0, REFERENCE_POINTS))
    return tuple(ordered.tolist())
