"""Evaluate: a classifier measured over a sweep of settings, and the best setting proposed.

- :mod:`.neighbours`: the stored exemplars, their exact (leave-one-out) neighbours and the
  label models' scores;
- :mod:`.votes`: what Classify's vote answers for every evaluated text;
- :mod:`.metrics`: the reports of those answers (accuracy, per-label metrics, calibration,
  out-of-scope metrics);
- :mod:`.choice`: the recommended setting, fitted temperatures and cross-fitted calibration, and
  the classifier apply_best proposes;
- :mod:`.sweep`: the :class:`Evaluator`, which builds the sweep and runs it.

The evaluator writes nothing: the service stores a proposal through the classifiers repository.
"""

from .choice import Evaluated, recommended_first, with_fitted_temperature
from .metrics import (
    LabelMetrics,
    OutOfScopeMetrics,
    Report,
    expected_calibration_error,
    report,
    standard_error,
)
from .neighbours import Exemplars, label_scores, nearest, stored_exemplars
from .sweep import Evaluation, Evaluator
from .votes import Outcome, Setting, outcomes

__all__ = [
    "Evaluated",
    "Evaluation",
    "Evaluator",
    "Exemplars",
    "LabelMetrics",
    "OutOfScopeMetrics",
    "Outcome",
    "Report",
    "Setting",
    "expected_calibration_error",
    "label_scores",
    "nearest",
    "outcomes",
    "recommended_first",
    "report",
    "standard_error",
    "stored_exemplars",
    "with_fitted_temperature",
]
