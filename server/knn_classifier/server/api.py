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

from . import deadlines, errors, paging, statuses, wire_size
from .domain import (
    ClassifierInfo,
    ClassifierUpdate,
    ClassifyOptions,
    EvaluateRequest,
    ExemplarInput,
    NewClassifier,
    ServiceInfo,
)
from .evaluation import OutOfScopeMetrics, Report
from .evaluator import Evaluation
from .out_of_scope import OutOfScopeFit
from .service import ClassifierService
from .voting import UnknownReason, Vote, Voting

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, Context], Awaitable[Response]]

API_VERSION = "v1"

_VOTING_FROM_PB = {
    pb.VOTING_MAJORITY: Voting.MAJORITY,
    pb.VOTING_SIMILARITY_WEIGHTED: Voting.SIMILARITY_WEIGHTED,
    pb.VOTING_SOFTMAX: Voting.SOFTMAX,
    pb.VOTING_CENTROID: Voting.CENTROID,
    pb.VOTING_DISCRIMINANT: Voting.DISCRIMINANT,
    pb.VOTING_MIXTURE: Voting.MIXTURE,
}
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
            ExemplarInput(text=e.text, label=e.label, id=e.id, metadata=dict(e.metadata))
            for e in request.exemplars
        ]
        ids, etag = await self._service.add_exemplars(request.classifier, items, request.etag)
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
        exemplars, next_token = await self._service.list_exemplars(
            request.classifier, request.page_size, request.page_token, request.label
        )
        return pb.ListExemplarsResponse(
            exemplars=[
                pb.Exemplar(
                    id=e.id,
                    text=e.text,
                    label=e.label,
                    metadata=e.metadata,
                    created_at=_timestamp(e.created_at),
                )
                for e in exemplars
            ],
            next_page_token=next_token,
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
    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: Context
    ) -> pb.ServiceInfo:
        return _service_info(self._service.info())


def _service_info(info: ServiceInfo) -> pb.ServiceInfo:
    limits = info.limits
    return pb.ServiceInfo(
        api_version=API_VERSION,
        server_version=info.server_version,
        dimensions=info.dimensions,
        embedder=pb.Embedder(model=info.model, width=info.width),
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
