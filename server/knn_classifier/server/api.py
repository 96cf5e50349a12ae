"""The gRPC servicer: protobuf in, domain types to the core, protobuf out.

The conversions between messages and domain types are in :mod:`messages` and
:mod:`evaluation_messages`. Errors are mapped to statuses with their details in one place,
:func:`_status_on_error` (by :mod:`statuses`). Unexpected exceptions become INTERNAL with a
generic message; the details go to the log only.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from . import (
    deadlines,
    errors,
    evaluation_messages,
    messages,
    paging,
    statuses,
    transfer,
    wire_size,
)
from .interception import Context
from .service import ClassifierService
from .voting import Vote

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[[Any, Request, Context], Awaitable[Response]]


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
        new = messages.new_classifier(request)
        return messages.classifier(await self._service.create_classifier(new))

    @_status_on_error
    async def GetClassifier(
        self, request: pb.GetClassifierRequest, context: Context
    ) -> pb.Classifier:
        return messages.classifier(await self._service.get_classifier(request.name))

    @_status_on_error
    async def ListClassifiers(
        self, request: pb.ListClassifiersRequest, context: Context
    ) -> pb.ListClassifiersResponse:
        infos, next_token = await self._service.list_classifiers(
            request.page_size, request.page_token
        )
        return pb.ListClassifiersResponse(
            classifiers=[messages.classifier(info) for info in infos], next_page_token=next_token
        )

    @_status_on_error
    async def UpdateClassifier(
        self, request: pb.UpdateClassifierRequest, context: Context
    ) -> pb.Classifier:
        update = messages.classifier_update(request)
        return messages.classifier(
            await self._service.update_classifier(update, request.classifier.etag)
        )

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
        items = messages.exemplar_inputs(request)
        ids, etag = await self._service.add_exemplars(
            request.classifier, items, request.etag, request.embedder_fingerprint
        )
        return pb.AddExemplarsResponse(ids=ids, etag=etag)

    @_status_on_error
    async def DeleteExemplars(
        self, request: pb.DeleteExemplarsRequest, context: Context
    ) -> pb.DeleteExemplarsResponse:
        deleted, etag = await self._service.delete_exemplars(
            request.classifier,
            list(request.ids.ids),
            request.label,
            request.etag,
            messages.exemplar_scope(request.scope),
        )
        return pb.DeleteExemplarsResponse(deleted=deleted, etag=etag)

    @_status_on_error
    async def ListExemplars(
        self, request: pb.ListExemplarsRequest, context: Context
    ) -> pb.ListExemplarsResponse:
        with_vectors = messages.with_vectors(request)
        exemplars, next_token, etag = await self._service.list_exemplars(
            request.classifier,
            request.page_size,
            request.page_token,
            request.label,
            list(request.vector_dimensions) if with_vectors else None,
            messages.exemplar_scope(request.scope),
        )
        return pb.ListExemplarsResponse(
            exemplars=[messages.exemplar(e) for e in exemplars],
            next_page_token=next_token,
            embedder_fingerprint=(
                transfer.fingerprint_id(self._service.fingerprint) if with_vectors else ""
            ),
            etag=etag,
        )

    @_status_on_error
    async def ListLabels(
        self, request: pb.ListLabelsRequest, context: Context
    ) -> pb.ListLabelsResponse:
        counts, next_token, negatives, etag = await self._service.list_labels(
            request.classifier, request.page_size, request.page_token
        )
        return pb.ListLabelsResponse(
            labels=[pb.LabelCount(label=label, count=count) for label, count in counts],
            next_page_token=next_token,
            out_of_scope_exemplars=negatives,
            etag=etag,
        )

    @_status_on_error
    async def Classify(self, request: pb.ClassifyRequest, context: Context) -> pb.ClassifyResponse:
        answers, etag = await self._service.classify(
            request.classifier, [request.text], messages.options(request.options)
        )
        answer = answers[0]
        if isinstance(answer, errors.InvalidArgument):
            raise answer
        include = request.options.include_neighbours
        self._check_size(answers, include)
        return pb.ClassifyResponse(prediction=messages.prediction(answer, include), etag=etag)

    @_status_on_error
    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: Context
    ) -> pb.ClassifyBatchResponse:
        answers, etag = await self._service.classify(
            request.classifier, list(request.texts), messages.options(request.options)
        )
        include = request.options.include_neighbours
        self._check_size(answers, include)
        return pb.ClassifyBatchResponse(
            results=[
                pb.ClassifyBatchResult(error=statuses.of_error(a))
                if isinstance(a, errors.InvalidArgument)
                else pb.ClassifyBatchResult(prediction=messages.prediction(a, include))
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
        evaluate = evaluation_messages.evaluate_request(request)
        evaluation, info, with_labels = await self._service.evaluate(
            request.classifier, evaluate, request.etag
        )
        # Off the event loop: a sweep over thousands of labels has that many metrics per setting.
        return await asyncio.to_thread(
            evaluation_messages.evaluate_response, evaluation, info, with_labels
        )

    @_status_on_error
    async def CheckExemplars(
        self, request: pb.CheckExemplarsRequest, context: Context
    ) -> pb.CheckExemplarsResponse:
        check = evaluation_messages.check_request(request)
        report, etag = await self._service.check_exemplars(request.classifier, check)
        return evaluation_messages.check_response(report, etag)

    @_status_on_error
    async def GetServiceInfo(
        self, request: pb.GetServiceInfoRequest, context: Context
    ) -> pb.ServiceInfo:
        fingerprint = transfer.fingerprint_id(self._service.fingerprint)
        return messages.service_info(self._service.info(), fingerprint)
