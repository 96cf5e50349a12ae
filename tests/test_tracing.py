"""OpenTelemetry traces of real calls: the SDK's in-memory exporter, and a real OTLP receiver."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from knn_classifier.client import Client, NotFoundError, RetryPolicy, UnavailableError
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc

from .conftest import ServerThread, make_settings, wait_for
from .fake_embedder import FakeEmbeddingServer

SERVICE = "knn_classifier.v1.ClassifierService"
EXEMPLARS = [
    ("my card has not arrived yet", "card_arrival"),
    ("I want to top up my account", "top_up"),
]


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def traced(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, exporter: InMemorySpanExporter
) -> Iterator[ServerThread]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    settings = make_settings(tmp_path / "data", fake_embedder.base_url)
    server = ServerThread(settings, tracer_provider=provider).start()
    yield server
    server.stop()


def rpc_span(spans: tuple[ReadableSpan, ...], method: str) -> ReadableSpan:
    (found,) = [s for s in spans if s.name == f"{SERVICE}/{method}"]
    return found


def rpcs(spans: tuple[ReadableSpan, ...]) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is SpanKind.SERVER]


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> dict[str, ReadableSpan]:
    assert parent.context is not None
    return {
        s.name: s
        for s in spans
        if s.parent is not None and s.parent.span_id == parent.context.span_id
    }


def test_a_classify_span_has_embedding_store_and_voting_children(
    traced: ServerThread, exporter: InMemorySpanExporter
) -> None:
    with traced.client() as client:
        client.create_classifier("support", k=2)
        client.add_exemplars("support", EXEMPLARS)
        exporter.clear()
        client.classify("support", "my card has not arrived")
    spans = exporter.get_finished_spans()
    classify = rpc_span(spans, "Classify")
    assert classify.kind is SpanKind.SERVER
    assert classify.parent is None
    attributes = dict(classify.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.method"] == "Classify"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["knn.classifier"] == "support"
    assert attributes["knn.texts"] == 1
    inner = children(spans, classify)
    assert set(inner) == {"embed", "store.query", "vote"}
    assert inner["embed"].attributes == {"knn.texts": 1}
    assert inner["store.query"].attributes == {"knn.dimension": 64, "knn.k": 2, "knn.queries": 1}
    assert dict(inner["vote"].attributes or {})["knn.voting"] == "similarity_weighted"
    assert classify.context is not None
    assert {s.context.trace_id for s in inner.values() if s.context} == {classify.context.trace_id}


def test_the_span_continues_the_callers_trace(
    traced: ServerThread, exporter: InMemorySpanExporter
) -> None:
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with traced.channel() as channel:
        classifier_pb2_grpc.ClassifierServiceStub(channel).ListClassifiers(
            pb.ListClassifiersRequest(),
            metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),),
        )
    span = rpc_span(exporter.get_finished_spans(), "ListClassifiers")
    assert span.context is not None
    assert span.parent is not None
    assert f"{span.context.trace_id:032x}" == trace_id
    assert f"{span.parent.span_id:016x}" == parent_id


def test_each_call_of_a_method_carries_its_own_trace_and_request_id(
    traced: ServerThread, exporter: InMemorySpanExporter
) -> None:
    """The call steps wrap a method's handler once, and read what a call carries per call."""
    parents = [
        ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"),
        ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"),
    ]
    with traced.channel() as channel:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
        for i, (trace_id, parent_id) in enumerate(parents):
            _, call = stub.ListClassifiers.with_call(
                pb.ListClassifiersRequest(),
                metadata=(
                    ("traceparent", f"00-{trace_id}-{parent_id}-01"),
                    ("x-request-id", f"call-{i}"),
                ),
            )
            assert ("x-request-id", f"call-{i}") in call.trailing_metadata()
    spans = [s for s in exporter.get_finished_spans() if s.name == f"{SERVICE}/ListClassifiers"]
    assert [f"{s.context.trace_id:032x}" for s in spans if s.context] == [t for t, _ in parents]
    assert [dict(s.attributes or {})["knn.request_id"] for s in spans] == ["call-0", "call-1"]


def test_client_errors_keep_the_span_unset_and_server_faults_mark_it(
    traced: ServerThread, exporter: InMemorySpanExporter, fake_embedder: FakeEmbeddingServer
) -> None:
    # One attempt per call: the client would retry the idempotent AddExemplars after UNAVAILABLE.
    with Client(traced.address, timeout=30, retry=RetryPolicy(max_attempts=1)) as client:
        client.create_classifier("support")
        with pytest.raises(NotFoundError):
            client.classify("nope", "text")
        fake_embedder.reset(fail_status=503, fail_times=10)
        with pytest.raises(UnavailableError):
            client.add_exemplars("support", EXEMPLARS)
    # An error status reaches the caller as the handler ends; the span closes just after.
    wait_for(lambda: len(rpcs(exporter.get_finished_spans())) == 3)
    spans = exporter.get_finished_spans()
    not_found = rpc_span(spans, "Classify")
    assert dict(not_found.attributes or {})["rpc.grpc.status_code"] == 5
    assert not_found.status.status_code is StatusCode.UNSET
    unavailable = rpc_span(spans, "AddExemplars")
    assert dict(unavailable.attributes or {})["rpc.grpc.status_code"] == 14
    assert unavailable.status.status_code is StatusCode.ERROR
    embed = children(spans, unavailable)["embed"]
    assert embed.status.status_code is StatusCode.ERROR  # the failure is seen where it happened


def test_tracing_is_off_without_an_endpoint(server: ServerThread) -> None:
    assert server.app is not None
    assert server.app.tracer_provider is None


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC receiver: keeps the names of the spans it is sent."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.received = threading.Event()

    def Export(self, request: Any, context: Any) -> trace_service_pb2.ExportTraceServiceResponse:
        for resource_spans in request.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                self.names.extend(span.name for span in scope_spans.spans)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_over_otlp_to_the_configured_endpoint(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    collector = Collector()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, receiver)  # type: ignore[no-untyped-call]
    port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    try:
        settings = make_settings(
            tmp_path / "data",
            fake_embedder.base_url,
            tracing={"otlp_endpoint": f"http://127.0.0.1:{port}", "service_name": "knn-test"},
        )
        server = ServerThread(settings).start()
        with server.client() as client:
            client.list_classifiers()
        server.stop()  # shuts the provider down, which exports what is queued
        assert collector.received.wait(timeout=30)
    finally:
        receiver.stop(grace=None)
    assert f"{SERVICE}/ListClassifiers" in collector.names
