"""OpenTelemetry tracing: a span per RPC (see telemetry.py) with children for the work inside.

Off by default: without ``tracing.otlp_endpoint`` no tracer provider exists, and :func:`traced`
and :func:`annotate` cost one context-variable read. The RPC interceptor puts the App's tracer in
a context variable for the call, so the spans of several servers in one process stay apart and
nothing is registered globally. Child spans are made only in the caller's own task: work shared
by several requests (the coalescer's embedding calls, a batched store query) is seen from each
request as the time it waited for it.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from .settings import TracingSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

P = ParamSpec("P")
R = TypeVar("R")

_tracer: ContextVar[trace.Tracer | None] = ContextVar("knn_tracer", default=None)


def otlp_provider(settings: TracingSettings) -> TracerProvider | None:
    """A provider exporting over OTLP/gRPC to ``settings.otlp_endpoint``, or None (no tracing)."""
    if not settings.otlp_endpoint:
        return None
    # Imported only when tracing is on: the SDK and the exporter add to every start-up otherwise.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    made = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    made.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otlp_endpoint)))
    return made


@contextmanager
def tracing_with(tracer: trace.Tracer) -> Iterator[None]:
    """Makes :func:`traced` record with ``tracer`` in this context (one RPC)."""
    token = _tracer.set(tracer)
    try:
        yield
    finally:
        _tracer.reset(token)


def traced(name: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Runs the decorated coroutine function in a child span ``name`` when tracing is on."""

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            tracer = _tracer.get()
            if tracer is None:
                return await function(*args, **kwargs)
            with tracer.start_as_current_span(name):
                return await function(*args, **kwargs)

        return wrapper

    return decorate


@contextmanager
def span(name: str) -> Iterator[None]:
    """A child span ``name`` around the block when tracing is on."""
    tracer = _tracer.get()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(name):
        yield


def annotate(**attributes: AttributeValue) -> None:
    """Sets attributes (prefixed ``knn.``) on the current span, if one is recording."""
    if _tracer.get() is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes({f"knn.{key}": value for key, value in attributes.items()})
