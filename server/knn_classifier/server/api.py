"""The gRPC servicer: protobuf in, domain types to the core, protobuf out.

Errors are mapped to status codes in one place, :func:`_status_on_error`. Unexpected exceptions
become INTERNAL with a generic message; the details go to the log only.
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

from . import deadlines, errors
from .domain import (
    ClassifierInfo,
    ClassifyOptions,
    EvaluateRequest,
    ExemplarInput,
    NewClassifier,
)
from .evaluation import Report
from .evaluator import Evaluation
from .service import ClassifierService
from .voting import UnknownReason, Vote, Voting

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, Context], Awaitable[Response]]

_STATUS: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

_VOTING_FROM_PB = {
    pb.VOTING_MAJORITY: Voting.MAJORITY,
    pb.VOTING_SIMILARITY_WEIGHTED: Voting.SIMILARITY_WEIGHTED,
    pb.VOTING_SOFTMAX: Voting.SOFTMAX,
    pb.VOTING_CENTROID: Voting.CENTROID,
    pb.VOTING_DISCRIMINANT: Voting.DISCRIMINANT,
}
_VOTING_TO_PB = {value: key for key, value in _VOTING_FROM_PB.items()}
_REASON_TO_PB = {
    UnknownReason.BELOW_MIN_SIMILARITY: pb.UNKNOWN_REASON_BELOW_MIN_SIMILARITY,
    UnknownReason.BELOW_MIN_CONFIDENCE: pb.UNKNOWN_REASON_BELOW_MIN_CONFIDENCE,
}


def _status_on_error(handler: Handler[Request, Response]) -> Handler[Request, Response]:
    @functools.wraps(handler)
    async def wrapper(self: Any, request: Request, context: Context) -> Response:
        try:
            with deadlines.within(context.time_remaining()):
                return await handler(self, request, context)
        except errors.ServiceError as exc:
            await context.abort(_STATUS[type(exc)], str(exc))
        except Exception:
            log.exception("unexpected error in %s", handler.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the server log")
        raise AssertionError("context.abort returned")  # pragma: no cover

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
        infos = await self._service.list_classifiers()
        return pb.ListClassifiersResponse(classifiers=[_classifier(info) for info in infos])

    @_status_on_error
    async def DeleteClassifier(
        self, request: pb.DeleteClassifierRequest, context: Context
    ) -> pb.DeleteClassifierResponse:
        deleted = await self._service.delete_classifier(request.name)
        return pb.DeleteClassifierResponse(deleted_exemplars=deleted)

    @_status_on_error
    async def AddExemplars(
        self, request: pb.AddExemplarsRequest, context: Context
    ) -> pb.AddExemplarsResponse:
        items = [
            ExemplarInput(text=e.text, label=e.label, id=e.id, metadata=dict(e.metadata))
            for e in request.exemplars
        ]
        ids = await self._service.add_exemplars(request.classifier, items)
        return pb.AddExemplarsResponse(ids=ids)

    @_status_on_error
    async def DeleteExemplars(
        self, request: pb.DeleteExemplarsRequest, context: Context
    ) -> pb.DeleteExemplarsResponse:
        deleted = await self._service.delete_exemplars(
            request.classifier, list(request.ids), request.label
        )
        return pb.DeleteExemplarsResponse(deleted=deleted)

    @_status_on_error
    async def ListExemplars(
        self, request: pb.ListExemplarsRequest, context: Context
    ) -> pb.ListExemplarsResponse:
        exemplars, next_token = await self._service.list_exemplars(
            request.classifier,
            request.page_size if request.HasField("page_size") else None,
            request.page_token,
            request.label,
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
        counts = await self._service.list_labels(request.classifier)
        return pb.ListLabelsResponse(
            labels=[pb.LabelCount(label=label, count=count) for label, count in counts]
        )

    @_status_on_error
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        answers = await self._service.classify(
            request.classifier, [request.text], _options(request.options)
        )
        answer = answers[0]
        if isinstance(answer, errors.InvalidArgument):
            raise answer
        return pb.ClassifyResponse(
            prediction=_prediction(answer, request.options.include_neighbours)
        )

    @_status_on_error
    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: Context
    ) -> pb.ClassifyBatchResponse:
        answers = await self._service.classify(
            request.classifier, list(request.texts), _options(request.options)
        )
        include = request.options.include_neighbours
        return pb.ClassifyBatchResponse(
            predictions=[
                pb.Prediction(error=pb.ItemError(code="INVALID_ARGUMENT", message=str(a)))
                if isinstance(a, errors.InvalidArgument)
                else _prediction(a, include)
                for a in answers
            ]
        )

    @_status_on_error
    async def Evaluate(self, request: pb.EvaluateRequest, context: Context) -> pb.EvaluateResponse:
        evaluate = EvaluateRequest(
            held_out=[(item.text, item.label) for item in request.held_out],
            k=list(request.k),
            voting=[_required_voting(v) for v in request.voting],
            dimension=list(request.dimension),
            temperature=list(request.temperature),
            apply_best=request.apply_best,
            target_precision=(
                request.target_precision if request.HasField("target_precision") else None
            ),
        )
        evaluation, info = await self._service.evaluate(request.classifier, evaluate)
        # Off the event loop: a sweep over thousands of labels has that many metrics per setting.
        return await asyncio.to_thread(_evaluate_response, evaluation, info)


def _required_voting(value: pb.Voting.ValueType) -> Voting:
    voting = _voting(value)
    if voting is None:
        raise errors.InvalidArgument("a voting method to sweep must be specified")
    return voting


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
    )


def _voting(value: pb.Voting.ValueType) -> Voting | None:
    if value == pb.VOTING_UNSPECIFIED:
        return None
    try:
        return _VOTING_FROM_PB[value]
    except KeyError:
        raise errors.InvalidArgument(f"unknown voting method {value}") from None


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
    )
    if include_neighbours:
        prediction.neighbours.extend(
            pb.Neighbour(id=n.id, label=n.label, text=n.text, similarity=n.similarity)
            for n in result.voters
        )
    return prediction
