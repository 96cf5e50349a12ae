"""Evaluate's response under the response budget (``KNN_LIMITS__MAX_RESPONSE_BYTES``).

The response holds per-label metrics for every setting of the sweep: labels x settings of them,
which passes the 4 MiB that stock gRPC clients accept with a few thousand labels and a sweep of
dozens of settings. The settings' measurements, the classifier and the unknown labels are always
sent; per-label metrics are kept for the leading results (the recommended setting first, then
the most accurate) as far as the budget allows, and left out of the others
(``EvaluateResponse.results_without_labels`` says how many). Refusing the response instead would
throw away the sweep's work, and with apply_best would report an error for a classifier already
updated; a caller wanting another setting's per-label metrics evaluates that setting alone.
"""

from __future__ import annotations

from . import paging, wire_size
from .domain import ClassifierInfo
from .evaluate import Evaluation


def results_with_labels(evaluation: Evaluation, classifier: ClassifierInfo, budget: int) -> int:
    """How many leading results of ``evaluation`` keep their per-label metrics in a response
    (with ``classifier``) under ``budget`` bytes. An evaluation whose response cannot fit even
    without any is refused (RESOURCE_EXHAUSTED, RESPONSE_TOO_LARGE): call this before storing
    what it applies."""
    always = [
        wire_size.classifier(classifier),
        *(wire_size.string(label) for label in evaluation.unknown_labels),
        *(wire_size.evaluation_result(report) for report in evaluation.reports),
    ]
    paging.ensure_fits(
        always,
        budget,
        "evaluate fewer settings per call (k_values, voting_methods, dimensions, temperatures) "
        "or held-out texts of fewer labels the classifier does not have",
    )
    room = budget - paging.ENVELOPE_BYTES - sum(always)
    for kept, report in enumerate(evaluation.reports):
        room -= wire_size.label_metrics(report.labels)
        if room < 0:
            return kept
    return len(evaluation.reports)
