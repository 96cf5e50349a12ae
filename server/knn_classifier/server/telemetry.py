"""Per-RPC telemetry: metrics, the access log and the server span, from one call step.

:class:`RpcTelemetry` is the first of the call steps (see interception), so it also sees the calls
that the API-key check refuses and those to unknown methods. For each unary call it takes the
request id from ``x-request-id`` metadata (or makes one) and returns it in the trailing metadata,
opens the server span (continuing the caller's W3C ``traceparent`` if there is one), runs the
handler, and then, knowing the status: counts the call and its latency per method and code, writes
one access-log line and closes the span. The status is that of ``context.abort`` (the servicer's
errors), UNKNOWN for an exception gRPC turns into one, CANCELLED or DEADLINE_EXCEEDED when the call
is cancelled, else OK.

Its :attr:`~RpcTelemetry.inner` part goes last, next to the servicer, where requests are parsed:
it notes the classifier and the number of texts for the access log and the span, and records the
predictions of Classify and ClassifyBatch in the per-classifier metrics, and removes those of a
classifier that DeleteClassifier deleted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, cast

import grpc
from grpc_health.v1 import health_pb2
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from knn_classifier.v1 import classifier_pb2 as pb

from . import logs, tracing
from .interception import Behaviour, Context, Handler, unary
from .metrics import Metrics

Metadata = Sequence[tuple[str, str | bytes]]

REQUEST_ID = "x-request-id"
_KNOWN_METHODS = frozenset(
    f"/{service.full_name}/{method.name}"
    for module in (pb, health_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
)
_VALID_REQUEST_ID = re.compile(r"[!-~]{1,128}")  # printable ASCII, no spaces
_QUIET_SERVICES = ("grpc.health.v1.Health", "grpc.reflection.")
"""Services whose access lines go to DEBUG: load balancers check health every few seconds."""
# Codes that mean the server failed, not the caller (OpenTelemetry's gRPC conventions).
_SERVER_FAULTS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)
_MAX_LOGGED_NAME = 100
_PROPAGATOR = TraceContextTextMapPropagator()

access_log = logging.getLogger("knn_classifier.access")


@dataclass
class _Call:
    """What the inner part learns about the call being served."""

    classifier: str = ""
    texts: int = 0


_call: ContextVar[_Call | None] = ContextVar("knn_call", default=None)


class RpcTelemetry:
    """The telemetry step of the unary methods; :attr:`inner` is its part next to the servicer."""

    def __init__(
        self,
        metrics: Metrics,
        tracer_provider: trace.TracerProvider | None = None,
        access: bool = True,
    ) -> None:
        self._metrics = metrics
        self._tracer = tracer_provider.get_tracer(__name__) if tracer_provider else None
        self._access = access
        self.inner = _RequestNotes(metrics)

    def __call__(self, handler: Handler, full_method: str) -> Handler:
        if handler.unary_unary is None:
            return handler  # streams (reflection, health's Watch) pass
        behaviour = cast(Behaviour, handler.unary_unary)
        # A call may name any method (unknown ones are answered through the steps too): only
        # the API's own names become labels, so series stay bounded.
        if full_method in _KNOWN_METHODS:
            service, _, method = full_method.lstrip("/").rpartition("/")
        else:
            service = method = "unknown"

        async def observed(request: Any, context: Context) -> Any:
            started = time.perf_counter()
            metadata = cast(Metadata, context.invocation_metadata() or ())
            request_id = _request_id(metadata)
            call = _Call()
            call_token, id_token = _call.set(call), logs.request_id.set(request_id)
            span = self._start_span(service, method, metadata, request_id)
            code = grpc.StatusCode.OK
            try:
                context.set_trailing_metadata(((REQUEST_ID, request_id),))
                if span is None:
                    return await behaviour(request, context)
                with self._within(span):
                    return await behaviour(request, context)
            except asyncio.CancelledError:
                left = context.time_remaining()
                expired = left is not None and left <= 0
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except BaseException:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            finally:
                if code is grpc.StatusCode.OK:
                    code = context.code() or grpc.StatusCode.OK
                seconds = time.perf_counter() - started
                self._metrics.count_rpc(service, method, code.name, seconds)
                if self._access:
                    self._log(service, method, code, seconds, call, request_id, context)
                _finish_span(span, code, call)
                _call.reset(call_token)
                logs.request_id.reset(id_token)

        return unary(handler, observed)

    @contextmanager
    def _within(self, span: trace.Span) -> Iterator[None]:
        """Makes ``span`` the current span and the App's tracer the one of child spans."""
        assert self._tracer is not None
        # The status comes from the gRPC code (see _finish_span), not from the exception.
        in_span = trace.use_span(span, record_exception=False, set_status_on_exception=False)
        with in_span, tracing.tracing_with(self._tracer):
            yield

    def _start_span(
        self, service: str, method: str, metadata: Metadata, request_id: str
    ) -> trace.Span | None:
        if self._tracer is None:
            return None
        parent = _PROPAGATOR.extract({str(k): v for k, v in metadata if isinstance(v, str)})
        return self._tracer.start_span(
            f"{service}/{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "rpc.system": "grpc",
                "rpc.service": service,
                "rpc.method": method,
                "knn.request_id": request_id,
            },
        )

    @staticmethod
    def _log(
        service: str,
        method: str,
        code: grpc.StatusCode,
        seconds: float,
        call: _Call,
        request_id: str,
        context: Context,
    ) -> None:
        level = logging.DEBUG if service.startswith(_QUIET_SERVICES) else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        classifier = _printable(call.classifier[:_MAX_LOGGED_NAME])
        milliseconds = round(seconds * 1000, 2)
        peer = context.peer()
        access_log.log(
            level,
            "%s %s %.2fms classifier=%s texts=%d request_id=%s peer=%s",
            method,
            code.name,
            milliseconds,
            classifier or "-",
            call.texts,
            request_id,
            peer,
            extra={
                "rpc": f"{service}/{method}",
                "status": code.name,
                "duration_ms": milliseconds,
                "classifier": classifier,
                "texts": call.texts,
                "request_id": request_id,
                "peer": peer,
            },
        )


class _RequestNotes:
    """The inner part of :class:`RpcTelemetry`, the last step: sees parsed requests and
    responses."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def __call__(self, handler: Handler, full_method: str) -> Handler:
        if handler.unary_unary is None:
            return handler
        behaviour = cast(Behaviour, handler.unary_unary)

        async def noted(request: Any, context: Context) -> Any:
            call = _call.get()
            if call is not None:
                call.classifier, call.texts = _describe(request)
            response = await behaviour(request, context)
            if isinstance(response, pb.ClassifyResponse):
                self._record(request.classifier, [response.prediction], rejected=0)
            elif isinstance(response, pb.ClassifyBatchResponse):
                predictions = [r.prediction for r in response.results if r.HasField("prediction")]
                rejected = len(response.results) - len(predictions)
                self._record(request.classifier, predictions, rejected)
            elif isinstance(response, pb.DeleteClassifierResponse):
                self._metrics.forget_classifier(request.name)
            return response

        return unary(handler, noted)

    def _record(self, classifier: str, predictions: list[pb.Prediction], rejected: int) -> None:
        """Counts the answers by outcome (texts refused in a batch as "rejected") and observes
        the confidence and top similarity of each prediction."""
        metrics = self._metrics
        label = metrics.classifier(classifier)
        confidence = metrics.series(metrics.confidence, label)
        top_similarity = metrics.series(metrics.top_similarity, label)
        outcomes: dict[str, int] = {"rejected": rejected} if rejected else {}
        for prediction in predictions:
            outcome = _outcome(prediction)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            confidence.observe(prediction.confidence)
            top_similarity.observe(prediction.top_similarity)
        for outcome, count in outcomes.items():
            metrics.series(metrics.predictions, label, outcome).inc(count)


def _request_id(metadata: Metadata) -> str:
    """The caller's ``x-request-id`` if printable ASCII of 1-128 characters, else a new one."""
    for key, value in metadata:
        if key == REQUEST_ID and isinstance(value, str) and _VALID_REQUEST_ID.fullmatch(value):
            return value
    return os.urandom(16).hex()


def _describe(request: Any) -> tuple[str, int]:
    """The classifier a request names and how many texts it carries (0 for other requests)."""
    classifier = getattr(request, "classifier", None)
    if not isinstance(classifier, str):
        name = getattr(request, "name", "")
        classifier = name if isinstance(name, str) else ""
    if isinstance(request, pb.ClassifyRequest):
        return classifier, 1
    for field in ("texts", "exemplars", "held_out_texts"):
        items = getattr(request, field, None)
        if items is not None:
            return classifier, len(items)
    return classifier, 0


def _outcome(prediction: pb.Prediction) -> str:
    if not prediction.unknown:
        return "label"
    reason = pb.UnknownReason.Name(prediction.unknown_reason)
    return reason.removeprefix("UNKNOWN_REASON_").lower()


def _finish_span(span: trace.Span | None, code: grpc.StatusCode, call: _Call) -> None:
    if span is None or not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if call.classifier:
        span.set_attribute("knn.classifier", call.classifier[:_MAX_LOGGED_NAME])
    span.set_attribute("knn.texts", call.texts)
    if code in _SERVER_FAULTS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _printable(value: str) -> str:
    """``value`` with control characters escaped, so a name cannot forge a log line."""
    return value if value.isprintable() else repr(value)[1:-1]
