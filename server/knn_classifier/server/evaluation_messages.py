"""Conversions between the protobuf messages of Evaluate and CheckExemplars (the two RPCs that
judge a classifier's exemplars) and their domain types: pure functions, proto -> domain (parsing,
which refuses bad values with :class:`errors.InvalidArgument`) and domain -> proto.
"""

from __future__ import annotations

import numpy as np

from knn_classifier.v1 import classifier_pb2 as pb

from . import errors, hygiene, messages
from .domain import ClassifierInfo, EvaluateRequest
from .evaluate import Evaluation, OutOfScopeMetrics, Report
from .voting import Voting


def evaluate_request(request: pb.EvaluateRequest) -> EvaluateRequest:
    return EvaluateRequest(
        held_out=[_held_out(i, item) for i, item in enumerate(request.held_out_texts)],
        k=list(request.k_values),
        voting=[_required_voting(v) for v in request.voting_methods],
        dimension=list(request.dimensions),
        temperature=list(request.temperatures),
        apply_best=request.apply_best,
        target_precision=(
            as_sent(request.target_precision) if request.HasField("target_precision") else None
        ),
        target_coverage=(
            as_sent(request.target_coverage) if request.HasField("target_coverage") else None
        ),
        leave_out_twins=(request.leave_out_twins if request.HasField("leave_out_twins") else True),
    )


def as_sent(value: float) -> float:
    """A proto ``float`` field as the caller wrote it. The field is 32-bit, so 0.8 arrives as
    0.800000011920929; the shortest decimal that reads back to the same 32-bit value is what was
    sent (0.8). It matters for targets compared with exact ratios: a precision of 68 / 85 meets a
    target of 0.8 and missed 0.800000011920929."""
    return float(str(np.float32(value)))


def check_request(request: pb.CheckExemplarsRequest) -> hygiene.CheckRequest:
    defaults = hygiene.CheckRequest()
    return hygiene.CheckRequest(
        min_confidence=(
            request.min_confidence
            if request.HasField("min_confidence")
            else defaults.min_confidence
        ),
        min_duplicate_similarity=(
            request.min_duplicate_similarity
            if request.HasField("min_duplicate_similarity")
            else defaults.min_duplicate_similarity
        ),
        min_label_exemplars=(
            request.min_label_exemplars
            if request.HasField("min_label_exemplars")
            else defaults.min_label_exemplars
        ),
        max_items=request.max_items,
    )


def _required_voting(value: pb.Voting.ValueType) -> Voting:
    voting = messages.voting(value)
    if voting is None:
        raise errors.InvalidArgument(
            "a voting method to sweep must be specified",
            reason=errors.Reason.FIELD_REQUIRED,
            field="voting_methods",
        )
    return voting


def _held_out(i: int, item: pb.LabelledText) -> tuple[str, str | None]:
    if not item.out_of_scope:
        return item.text, item.label
    if item.label:
        raise errors.InvalidArgument(
            f"held_out_texts[{i}] is marked out_of_scope but has label {item.label[:80]!r}; "
            "send an out-of-scope text without a label",
            field=f"held_out_texts[{i}].label",
        )
    return item.text, None


def _out_of_scope_metrics(metrics: OutOfScopeMetrics | None) -> pb.OutOfScopeMetrics | None:
    if metrics is None:
        return None
    return pb.OutOfScopeMetrics(
        out_of_scope_texts=metrics.out_of_scope_texts,
        in_scope_texts=metrics.in_scope_texts,
        recall=metrics.recall,
        in_scope_coverage=metrics.in_scope_coverage,
        in_scope_accuracy=metrics.in_scope_accuracy,
        auroc=metrics.auroc,
        top_similarity_auroc=metrics.top_similarity_auroc,
        threshold=messages.out_of_scope_threshold(metrics.threshold),
    )


def evaluate_response(
    evaluation: Evaluation, info: ClassifierInfo, with_labels: int
) -> pb.EvaluateResponse:
    """The response, with per-label metrics in the first ``with_labels`` results only
    (:mod:`evaluation_budget`)."""
    reached = evaluation.reached
    reports = evaluation.reports
    return pb.EvaluateResponse(
        results=[_evaluation_result(r, i < with_labels) for i, r in enumerate(reports)],
        results_without_labels=len(reports) - with_labels,
        unknown_labels=evaluation.unknown_labels,
        classifier=messages.classifier(info),
        thresholds=(
            pb.ThresholdsReached(
                target_met=reached.target_met,
                precision=reached.precision,
                coverage=reached.coverage,
            )
            if reached
            else None
        ),
        near_duplicates=(
            pb.NearDuplicates(
                share=evaluation.twins.share,
                similarity=evaluation.twins.threshold,
                sampled=len(evaluation.twins.counts),
                dimension=evaluation.twins.dimension,
            )
            if evaluation.twins
            else None
        ),
    )


def _checked(ref: hygiene.ExemplarRef) -> pb.CheckedExemplar:
    return pb.CheckedExemplar(id=ref.id, text=ref.text, label=ref.label)


def check_response(report: hygiene.Report, etag: str) -> pb.CheckExemplarsResponse:
    mislabelled, duplicates, overlaps, small = report.found
    setting = report.setting
    return pb.CheckExemplarsResponse(
        likely_mislabelled_exemplars=[
            pb.LikelyMislabelled(
                exemplar=_checked(m.exemplar), voted_label=m.voted_label, confidence=m.confidence
            )
            for m in report.mislabelled
        ],
        duplicates=[
            pb.CrossLabelDuplicate(
                first=_checked(d.first), second=_checked(d.second), similarity=d.similarity
            )
            for d in report.duplicates
        ],
        overlapping_labels=[
            pb.LabelOverlap(
                first_label=o.first_label,
                second_label=o.second_label,
                first_as_second=o.first_as_second,
                second_as_first=o.second_as_first,
                first_errors_share=o.first_errors_share,
                second_errors_share=o.second_errors_share,
                centroid_similarity=o.centroid_similarity,
            )
            for o in report.overlaps
        ],
        small_labels=[pb.LabelCount(label=label, count=n) for label, n in report.small_labels],
        likely_mislabelled_exemplars_found=mislabelled,
        duplicates_found=duplicates,
        overlapping_labels_found=overlaps,
        small_labels_found=small,
        checked=report.checked,
        exemplar_count=report.exemplar_count,
        k=setting.k,
        voting=messages.VOTING_TO_PB[setting.voting],
        dimension=setting.dimension,
        etag=etag,
        exemplars_nearest_out_of_scope=[_checked(e) for e in report.nearest_negative],
        exemplars_nearest_out_of_scope_found=report.nearest_negative_found,
        out_of_scope_exemplars=report.negatives,
    )


def _evaluation_result(report: Report, with_labels: bool) -> pb.EvaluationResult:
    setting = report.setting
    return pb.EvaluationResult(
        k=setting.k,
        voting=messages.VOTING_TO_PB[setting.voting],
        dimension=setting.dimension,
        temperature=setting.temperature,
        accuracy=report.accuracy,
        macro_f1=report.macro_f1,
        coverage=report.coverage,
        accuracy_on_covered=report.accuracy_on_covered,
        expected_calibration_error=report.expected_calibration_error,
        evaluated=report.evaluated,
        labels=[
            pb.LabelMetrics(
                label=m.label, precision=m.precision, recall=m.recall, f1=m.f1, support=m.support
            )
            for m in (report.labels if with_labels else ())
        ],
        top_confusions=[
            pb.Confusion(true_label=t, predicted_label=p, count=c) for t, p, c in report.confusions
        ],
        out_of_scope=_out_of_scope_metrics(report.out_of_scope),
        accuracy_without_twins=report.accuracy_without_twins,
        accuracy_with_twins=report.accuracy_with_twins,
    )
