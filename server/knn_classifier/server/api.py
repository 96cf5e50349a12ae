"""The gRPC servicer: protobuf in, domain types to the core, protobuf out.

Errors are mapped to statuses with their details in one place, :func:`_status_on_error` (by
:mod:`statuses`). Unexpected exceptions become INTERNAL with a generic message; the details go
to the log only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from . import deadlines, errors, hygiene, paging, statuses, transfer, wire_size
from .calibration import Calibration
from .domain import (
    ClassifierInfo,
    ClassifierUpdate,
    ClassifyOptions,
    EvaluateRequest,
    Exemplar,
    ExemplarInput,
    NewClassifier,
    ServiceInfo,
)
from .evaluate import Evaluation, OutOfScopeMetrics, Report
from .out_of_scope import OutOfScopeFit
from .service import ClassifierService
from .voting import UnknownReason, Vote, Voting

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, Context], Awaitable[Response]]

API_VERSION = "v1"

# Each method of voting.Voting is the proto's VOTING_<NAME>: a method the proto lacks fails here,
# at import; one voting.py lacks is refused as an unknown value (tests/test_voting_names.py).
_VOTING_FROM_PB = {pb.Voting.Value(f"VOTING_{method.name}"): method for method in Voting}
_VOTING_TO_PB = {value: key for key, value in _VOTING_FROM_PB.items()}
_REASON_TO_PB = {
    UnknownReason.BELOW_MIN_SIMILARITY: pb.UNKNOWN_REASON_BELOW_MIN_SIMILARITY,
    UnknownReason.BELOW_MIN_CONFIDENCE: pb.UNKNOWN_REASON_BELOW_MIN_CONFIDENCE,
    UnknownReason.OUT_OF_SCOPE: pb.UNKNOWN_REASON_OUT_OF_SCOPE,
    UnknownReason.AMBIGUOUS: pb.UNKNOWN_REASON_AMBIGUOUS,
}


def _status_on_error(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        try:
            with deadlines.within(context.time_remaining()):
                return await handler(self, request, context)
        except errors.ServiceError as exc:
            await statuses.abort(context, statuses.of_error(exc))
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            await statuses.abort(context, statuses.INTERNAL)

    return wrapper


class ClassifierServicer(pb_grpc.ClassifierServiceServicer):
    def __init__(self, service: ClassifierService) -> None:
        self._service = service

    @_status_on_error
    async def CreateClassifier(
        self, request: pb.CreateClassifierRequest, context: Context
    ) -> pb.Classifier:
        new = NewClassifier(
            name=request.name,
            instruction=request.instruction,
            k=request.k if request.HasField("k") else None,
            voting=_voting(request.voting),
            min_similarity=request.min_similarity if request.HasField("min_similarity") else None,
            min_confidence=request.min_confidence if request.HasField("min_confidence") else None,
            temperature=request.temperature if request.HasField("temperature") else None,
            dimension=request.dimension if request.HasField("dimension") else None,
            calibration=(
                Calibration(
                    tuple(request.calibration.shares), tuple(request.calibration.probabilities)
                )
                if request.HasField("calibration")
                else None
            ),
            embedder_fingerprint=request.embedder_fingerprint,
        )
        return _classifier(await self._service.create_classifier(new))

    @_status_on_error
    async def GetClassifier(
        self, request: pb.GetClassifierRequest, context: Context
    ) -> pb.Classifier:
        return _classifier(await self._service.get_classifier(request.name))

    @_status_on_error
    async def ListClassifiers(
        self, request: pb.ListClassifiersRequest, context: Context
    ) -> pb.ListClassifiersResponse:
        infos, next_token = await self._service.list_classifiers(
            request.page_size, request.page_token
        )
        return pb.ListClassifiersResponse(
            classifiers=[_classifier(info) for info in infos], next_page_token=next_token
        )

    @_status_on_error
    async def UpdateClassifier(
        self, request: pb.UpdateClassifierRequest, context: Context
    ) -> pb.Classifier:
        given = request.classifier
        paths = tuple(request.update_mask.paths)
        update = ClassifierUpdate(
            name=given.name,
            paths=paths,
            k=given.k,
            voting=_voting(given.voting) if "voting" in paths else None,
            temperature=given.temperature,
            min_similarity=given.min_similarity,
            min_confidence=given.min_confidence,
            dimension=given.dimension,
        )
        return _classifier(await self._service.update_classifier(update, given.etag))

    @_status_on_error
    async def DeleteClassifier(
        self, request: pb.DeleteClassifierRequest, context: Context
    ) -> pb.DeleteClassifierResponse:
        deleted = await self._service.delete_classifier(request.name, request.etag)
        return pb.DeleteClassifierResponse(deleted_exemplars=deleted)

    @_status_on_error
    async def AddExemplars(
        self, request: pb.AddExemplarsRequest, context: Context
    ) -> pb.AddExemplarsResponse:
        items = [
            ExemplarInput(
                text=e.text,
                label=e.label,
                id=e.id,
                metadata=dict(e.metadata),
                vectors=[(v.dimension, v.values) for v in e.vectors],
            )
            for e in request.exemplars
        ]
        ids, etag = await self._service.add_exemplars(
            request.classifier, items, request.etag, request.embedder_fingerprint
        )
        return pb.AddExemplarsResponse(ids=ids, etag=etag)

    @_status_on_error
    async def DeleteExemplars(
        self, request: pb.DeleteExemplarsRequest, context: Context
    ) -> pb.DeleteExemplarsResponse:
        deleted, etag = await self._service.delete_exemplars(
            request.classifier, list(request.ids.ids), request.label, request.etag
        )
        return pb.DeleteExemplarsResponse(deleted=deleted, etag=etag)

    @_status_on_error
    async def ListExemplars(
        self, request: pb.ListExemplarsRequest, context: Context
    ) -> pb.ListExemplarsResponse:
        with_vectors = _with_vectors(request)
        exemplars, next_token = await self._service.list_exemplars(
            request.classifier,
            request.page_size,
            request.page_token,
            request.label,
            list(request.vector_dimensions) if with_vectors else None,
        )
        return pb.ListExemplarsResponse(
            exemplars=[_exemplar(e) for e in exemplars],
            next_page_token=next_token,
            embedder_fingerprint=(
                transfer.fingerprint_id(self._service.fingerprint) if with_vectors else ""
            ),
        )

    @_status_on_error
    async def ListLabels(
        self, request: pb.ListLabelsRequest, context: Context
    ) -> pb.ListLabelsResponse:
        counts, next_token = await self._service.list_labels(
            request.classifier, request.page_size, request.page_token
        )
        return pb.ListLabelsResponse(
            labels=[pb.LabelCount(label=label, count=count) for label, count in counts],
            next_page_token=next_token,
        )

    @_status_on_error
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        answers, etag = await self._service.classify(
            request.classifier, [request.text], _options(request.options)
        )
        answer = answers[0]
        if isinstance(answer, errors.InvalidArgument):
            raise answer
        include = request.options.include_neighbours
        self._check_size(answers, include)
        return pb.ClassifyResponse(prediction=_prediction(answer, include), etag=etag)

    @_status_on_error
    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: Context
    ) -> pb.ClassifyBatchResponse:
        answers, etag = await self._service.classify(
            request.classifier, list(request.texts), _options(request.options)
        )
        include = request.options.include_neighbours
        self._check_size(answers, include)
        return pb.ClassifyBatchResponse(
            results=[
                pb.ClassifyBatchResult(error=statuses.of_error(a))
                if isinstance(a, errors.InvalidArgument)
                else pb.ClassifyBatchResult(prediction=_prediction(a, include))
                for a in answers
            ],
            etag=etag,
        )

    def _check_size(self, answers: list[Vote | errors.InvalidArgument], include: bool) -> None:
        """Refuses a classify response over the budget before any of it is built."""
        budget = self._service.limits.max_response_bytes

        def size(answer: Vote | errors.InvalidArgument) -> int:
            if isinstance(answer, errors.InvalidArgument):
                return wire_size.status(statuses.of_error(answer).ByteSize())
            return wire_size.prediction(answer, include, stop_above=budget)

        paging.ensure_fits(
            (size(a) for a in answers),
            budget,
            "ask for fewer texts per call, a smaller k, or no neighbours",
        )

    @_status_on_error
    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        evaluate = EvaluateRequest(
            held_out=[_held_out(i, item) for i, item in enumerate(request.held_out_texts)],
            k=list(request.k_values),
            voting=[_required_voting(v) for v in request.voting_methods],
            dimension=list(request.dimensions),
            temperature=list(request.temperatures),
            apply_best=request.apply_best,
            target_precision=(
                request.target_precision if request.HasField("target_precision") else None
            ),
            target_coverage=(
                request.target_coverage if request.HasField("target_coverage") else None
            ),
        )
        evaluation, info = await self._service.evaluate(request.classifier, evaluate, request.etag)
        # Off the event loop: a sweep over thousands of labels has that many metrics per setting.
        return await asyncio.to_thread(_evaluate_response, evaluation, info)

    @_status_on_error
    async def CheckExemplars(
        self, request: pb.CheckExemplarsRequest, context: Context
    ) -> pb.CheckExemplarsResponse:
        defaults = hygiene.CheckRequest()
        check = hygiene.CheckRequest(
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
        report, etag = await self._service.check_exemplars(request.classifier, check)
        return _check_response(report, etag)

    @_status_on_error
    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: Context
    ) -> pb.ServiceInfo:
        fingerprint = transfer.fingerprint_id(self._service.fingerprint)
        return _service_info(self._service.info(), fingerprint)


def _service_info(info: ServiceInfo, fingerprint: str) -> pb.ServiceInfo:
    limits = info.limits
    return pb.ServiceInfo(
        api_version=API_VERSION,
        server_version=info.server_version,
        dimensions=info.dimensions,
        embedder=pb.Embedder(model=info.model, width=info.width, fingerprint=fingerprint),
        limits=pb.Limits(
            max_text_chars=limits.max_text_chars,
            max_batch_size=limits.max_batch_size,
            max_k=limits.max_k,
            max_batch_neighbours=limits.max_batch_neighbours,
            max_page_size=limits.max_page_size,
            max_sweep=limits.max_sweep,
            max_evaluated=limits.max_evaluated,
            max_exemplars_per_classifier=limits.max_exemplars_per_classifier,
            max_request_bytes=limits.max_request_bytes,
            max_response_bytes=limits.max_response_bytes,
        ),
    )


def _required_voting(value: pb.Voting.ValueType) -> Voting:
    voting = _voting(value)
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


def _out_of_scope_threshold(rule: OutOfScopeFit | None) -> pb.OutOfScopeThreshold | None:
    if rule is None:
        return None
    return pb.OutOfScopeThreshold(
        threshold=rule.threshold,
        target_coverage=rule.target_coverage,
        coverage=rule.coverage,
        dimension=rule.dimension,
    )


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
        threshold=_out_of_scope_threshold(metrics.threshold),
    )


def _evaluate_response(evaluation: Evaluation, info: ClassifierInfo) -> pb.EvaluateResponse:
    reached = evaluation.reached
    return pb.EvaluateResponse(
        results=[_evaluation_result(r) for r in evaluation.reports],
        unknown_labels=evaluation.unknown_labels,
        classifier=_classifier(info),
        thresholds=(
            pb.ThresholdsReached(
                target_met=reached.target_met,
                precision=reached.precision,
                coverage=reached.coverage,
            )
            if reached
            else None
        ),
    )


def _checked(ref: hygiene.ExemplarRef) -> pb.CheckedExemplar:
    return pb.CheckedExemplar(id=ref.id, text=ref.text, label=ref.label)


def _check_response(report: hygiene.Report, etag: str) -> pb.CheckExemplarsResponse:
    mislabelled, duplicates, overlaps, small = report.found
    setting = report.setting
    return pb.CheckExemplarsResponse(
        likely_mislabelled=[
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
        likely_mislabelled_found=mislabelled,
        duplicates_found=duplicates,
        overlapping_labels_found=overlaps,
        small_labels_found=small,
        checked=report.checked,
        exemplar_count=report.exemplar_count,
        k=setting.k,
        voting=_VOTING_TO_PB[setting.voting],
        dimension=setting.dimension,
        etag=etag,
    )


def _evaluation_result(report: Report) -> pb.EvaluationResult:
    setting = report.setting
    return pb.EvaluationResult(
        k=setting.k,
        voting=_VOTING_TO_PB[setting.voting],
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
            for m in report.labels
        ],
        top_confusions=[
            pb.Confusion(true_label=t, predicted_label=p, count=c) for t, p, c in report.confusions
        ],
        out_of_scope=_out_of_scope_metrics(report.out_of_scope),
    )


def _voting(value: pb.Voting.ValueType) -> Voting | None:
    if value == pb.VOTING_UNSPECIFIED:
        return None
    try:
        return _VOTING_FROM_PB[value]
    except KeyError:
        raise errors.InvalidArgument(
            f"unknown voting method {value}", reason=errors.Reason.VALUE_OUT_OF_RANGE
        ) from None


def _options(options: pb.ClassifyOptions) -> ClassifyOptions:
    return ClassifyOptions(
        k=options.k if options.HasField("k") else None,
        dimension=options.dimension if options.HasField("dimension") else None,
        voting=_voting(options.voting),
        min_similarity=options.min_similarity if options.HasField("min_similarity") else None,
        min_confidence=options.min_confidence if options.HasField("min_confidence") else None,
        temperature=options.temperature if options.HasField("temperature") else None,
    )


def _with_vectors(request: pb.ListExemplarsRequest) -> bool:
    """Whether ListExemplars is asked for the exemplars' vectors (its view)."""
    if request.view not in (
        pb.EXEMPLAR_VIEW_UNSPECIFIED,
        pb.EXEMPLAR_VIEW_BASIC,
        pb.EXEMPLAR_VIEW_WITH_VECTORS,
    ):
        raise errors.InvalidArgument(
            f"unknown view {request.view}", reason=errors.Reason.VALUE_OUT_OF_RANGE, field="view"
        )
    with_vectors = request.view == pb.EXEMPLAR_VIEW_WITH_VECTORS
    if request.vector_dimensions and not with_vectors:
        raise errors.InvalidArgument(
            "vector_dimensions needs view EXEMPLAR_VIEW_WITH_VECTORS",
            field="vector_dimensions",
        )
    return with_vectors


def _exemplar(exemplar: Exemplar) -> pb.Exemplar:
    return pb.Exemplar(
        id=exemplar.id,
        text=exemplar.text,
        label=exemplar.label,
        metadata=exemplar.metadata,
        created_at=_timestamp(exemplar.created_at),
        vectors=[
            pb.ExemplarVector(dimension=dimension, values=values)
            for dimension, values in sorted(exemplar.vectors.items())
        ],
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _classifier(info: ClassifierInfo) -> pb.Classifier:
    config = info.config
    return pb.Classifier(
        name=config.name,
        instruction=config.instruction,
        k=config.k,
        voting=_VOTING_TO_PB[config.voting],
        min_similarity=config.min_similarity,
        min_confidence=config.min_confidence,
        created_at=_timestamp(config.created_at),
        exemplar_count=info.exemplar_count,
        temperature=config.temperature,
        dimension=config.dimension,
        calibrated=config.calibration is not None,
        etag=config.etag,
        calibration=(
            pb.Calibration(
                shares=config.calibration.shares, probabilities=config.calibration.probabilities
            )
            if config.calibration
            else None
        ),
        out_of_scope_threshold=_out_of_scope_threshold(config.out_of_scope),
    )


def _prediction(result: Vote, include_neighbours: bool) -> pb.Prediction:
    prediction = pb.Prediction(
        label=result.label or "",
        unknown=result.label is None,
        unknown_reason=(
            _REASON_TO_PB[result.unknown_reason]
            if result.unknown_reason
            else pb.UNKNOWN_REASON_UNSPECIFIED
        ),
        confidence=result.confidence,
        scores=[pb.LabelScore(label=label, score=score) for label, score in result.scores],
        top_similarity=result.top_similarity,
        candidates=result.candidates,
    )
    check = result.out_of_scope
    if check is not None:
        prediction.out_of_scope.CopyFrom(
            pb.OutOfScopeCheck(
                score=check.score, threshold=check.threshold, target_coverage=check.target_coverage
            )
        )
    if include_neighbours:
        prediction.neighbours.extend(
            pb.Neighbour(id=n.id, label=n.label, text=n.text, similarity=n.similarity)
            for n in result.voters
        )
    return prediction
