"""The choice of the best setting, and the classifier apply_best proposes with it."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from .. import thresholds, validation
from ..calibration import Calibration, fitted_temperature
from ..domain import ClassifierConfig
from ..thresholds import Reached, Thresholds
from ..vectors import Matrix
from ..voting import LABEL_TEMPERATURE, Voting
from .metrics import Report, standard_error
from .votes import Outcome, Setting

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluated:
    """One setting's report, its answers, and their uncalibrated shares."""

    report: Report
    outcomes: list[Outcome]
    raw_shares: list[float]
    vetoed: frozenset[int] = frozenset()
    """The outcomes a negative exemplar vetoes: never answered, whatever the thresholds."""


def recommended_first(ranked: list[Evaluated], truth: Sequence[str]) -> list[Evaluated]:
    """``ranked`` (by accuracy; ``truth`` the texts' labels) with the recommended setting first:
    a label model whose accuracy is within one standard error of the most accurate setting's
    (the one-standard-error rule), else the most accurate setting. Of the two label models the
    centroid, which has fewer parameters, unless the discriminant is right more often by more
    than the standard error of the difference on the same texts.

    With few exemplars, leave-one-out accuracy moves in steps of several points and often
    crowns 1-NN, or the discriminant's covariance, by luck; label models generalise better
    there, while on large classifiers they fall many standard errors behind (docs/accuracy.md).
    """
    top = ranked[0].report
    close = [r for r in ranked if r.report.accuracy >= top.accuracy - standard_error(top)]
    centroid, discriminant = (
        next((r for r in close if r.report.setting.voting is voting), None)
        for voting in (Voting.CENTROID, Voting.DISCRIMINANT)
    )
    if centroid and discriminant:
        gain = _right(discriminant, truth) - _right(centroid, truth)
        better = gain.mean() > gain.std() / math.sqrt(len(gain))
        recommended = discriminant if better else centroid
    else:
        recommended = centroid or discriminant or ranked[0]
    return [recommended, *(r for r in ranked if r is not recommended)]


def with_fitted_temperature(
    setting: Setting, label_scores: tuple[list[str], Matrix], truth: Sequence[str]
) -> Setting:
    """``setting`` (a label model's) with the temperature fitted on its leave-one-out scores,
    the requested one as the prior's centre (:func:`calibration.fitted_temperature`)."""
    labels, scores = label_scores
    position = {label: i for i, label in enumerate(labels)}
    columns = np.asarray([position[label] for label in truth], dtype=np.intp)
    if setting.voting is Voting.MIXTURE:  # the softmax part's temperature is swept, not fitted
        fitted = fitted_temperature(scores.astype(np.float64), columns, LABEL_TEMPERATURE)
        return dataclasses.replace(setting, label_temperature=fitted)
    fitted = fitted_temperature(scores.astype(np.float64), columns, setting.temperature)
    return dataclasses.replace(setting, temperature=min(fitted, validation.MAX_TEMPERATURE))


def _right(evaluated: Evaluated, truth: Sequence[str]) -> npt.NDArray[np.float64]:
    """1 for each text the setting answered right, else 0."""
    answers = [o.label for o in evaluated.outcomes]
    return np.array([a == t for a, t in zip(answers, truth, strict=True)], dtype=np.float64)


def cross_fitted(outcomes: Sequence[Outcome], truth: Sequence[str]) -> list[float]:
    """Each half's confidences calibrated by an isotonic map fitted on the other half."""
    shares = [o.confidence for o in outcomes]
    right = [o.best_label == t for o, t in zip(outcomes, truth, strict=True)]
    halves = [list(range(0, len(shares), 2)), list(range(1, len(shares), 2))]
    calibrated = list(shares)
    for fit_on, apply_to in (halves, halves[::-1]):
        if not fit_on:
            continue
        calibration = Calibration.fit([shares[i] for i in fit_on], [right[i] for i in fit_on])
        for i in apply_to:
            calibrated[i] = calibration(shares[i])
    return calibrated


def proposal(
    config: ClassifierConfig,
    best: Evaluated,
    truth: Sequence[str],
    target_precision: float | None,
) -> tuple[ClassifierConfig, Reached | None]:
    """``config`` with the best setting as its defaults and a calibration fitted on all its
    shares; with ``target_precision``, also its thresholds fitted jointly to it
    (:mod:`thresholds`), or left as they are when it is out of reach; and what they reach."""
    setting = best.report.setting
    correct = [o.best_label == t for o, t in zip(best.outcomes, truth, strict=True)]
    updated = dataclasses.replace(
        config,
        k=setting.k,
        voting=setting.voting,
        dimension=setting.dimension,
        temperature=setting.temperature,
        label_temperature=setting.label_temperature,
        calibration=Calibration.fit(best.raw_shares, correct),
    )
    if target_precision is None:
        return updated, None
    # Vetoed answers are unknown whatever the thresholds: fitted on the others, and counted
    # as not kept in the coverage reached.
    answerable = [i for i in range(len(correct)) if i not in best.vetoed]
    similarities = [best.outcomes[i].top_similarity for i in answerable]
    confidences = [best.outcomes[i].confidence for i in answerable]
    right = [correct[i] for i in answerable]
    fitted = thresholds.fit(similarities, confidences, right, target_precision)
    if fitted is None:
        log.warning(
            "classifier %s: no thresholds reach precision %g on %d leave-one-out answers; "
            "min_similarity and min_confidence left as they were",
            config.name,
            target_precision,
            len(right),
        )
    else:
        updated = dataclasses.replace(
            updated, min_similarity=fitted.min_similarity, min_confidence=fitted.min_confidence
        )
    precision, coverage = thresholds.kept(
        similarities,
        confidences,
        right,
        Thresholds(updated.min_similarity, updated.min_confidence),
    )
    coverage *= len(answerable) / max(len(best.outcomes), 1)
    return updated, Reached(fitted is not None, precision, coverage)
