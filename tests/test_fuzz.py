"""Random and malformed requests: every answer is a defined status with its ErrorInfo, and the
server stays healthy."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings, raw_method
from .fake_embedder import FakeEmbeddingServer

SERVICE = "/knn_classifier.v1.ClassifierService/"
METHODS = [m.name for m in pb.DESCRIPTOR.services_by_name["ClassifierService"].methods]
DEFINED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=300) | st.sampled_from(
    ["", " ", "\x00", "\u202e\u0000\ufeff", "🙂" * 50, "x" * 9000, "中文\n\t\r"]
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, grpc.Channel]]:
    embedder = FakeEmbeddingServer().start()
    settings_ = make_settings(tmp_path_factory.mktemp("fuzz"), embedder.base_url)
    running = ServerThread(settings_).start()
    with running.client() as client:
        client.create_classifier("target")
        client.add_exemplars("target", [("alpha beta", "a"), ("gamma delta", "b")])
    channel = running.channel()
    yield running, channel
    channel.close()
    running.stop()
    embedder.stop()


def status_of(channel: grpc.Channel, method: str, payload: bytes) -> grpc.StatusCode:
    """The call's status; an error must carry a google.rpc.Status of the same code whose first
    detail is an ErrorInfo of the service's domain."""
    call = raw_method(channel, SERVICE + method)
    try:
        call(payload, timeout=10)
    except grpc.RpcError as error:
        code: grpc.StatusCode = error.code()
        trailers: dict[str, Any] = dict(error.trailing_metadata())  # type: ignore[arg-type]
        details = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
        info = error_details_pb2.ErrorInfo()
        assert details.code == code.value[0], (method, code, details)
        assert details.details[0].Unpack(info), (method, details)
        assert (info.domain, bool(info.reason)) == ("knn_classifier.v1", True), (method, info)
        return code
    return grpc.StatusCode.OK


def assert_healthy(channel: grpc.Channel) -> None:
    response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING


@FUZZ
@given(method=st.sampled_from(METHODS), payload=st.binary(max_size=2000))
def test_random_bytes(
    fuzzed: tuple[ServerThread, grpc.Channel], method: str, payload: bytes
) -> None:
    _, channel = fuzzed
    assert status_of(channel, method, payload) in DEFINED


@FUZZ
@given(
    classifier=st.sampled_from(["target", "missing", ""]) | text,
    texts=st.lists(text, max_size=5),
    label=text,
    k=st.integers(-(2**31), 2**31 - 1) | st.none(),
    dimension=st.integers(-(2**31), 2**31 - 1) | st.none(),
    voting=st.integers(-5, 10),
    similarity=st.floats(allow_nan=True, allow_infinity=True, width=32) | st.none(),
    page_token=text,
)
def test_malformed_fields(
    fuzzed: tuple[ServerThread, grpc.Channel],
    classifier: str,
    texts: list[str],
    label: str,
    k: int | None,
    dimension: int | None,
    voting: int,
    similarity: float | None,
    page_token: str,
) -> None:
    _, channel = fuzzed
    options = pb.ClassifyOptions(
        k=k,
        dimension=dimension,
        voting=pb.Voting.ValueType(voting),
        min_similarity=similarity,
    )
    requests = {
        "Classify": pb.ClassifyRequest(
            classifier=classifier, text=texts[0] if texts else "", options=options
        ),
        "ClassifyBatch": pb.ClassifyBatchRequest(
            classifier=classifier, texts=texts, options=options
        ),
        "AddExemplars": pb.AddExemplarsRequest(
            classifier=classifier,
            exemplars=[pb.ExemplarInput(text=t, label=label, id=label[:200]) for t in texts],
        ),
        "ListExemplars": pb.ListExemplarsRequest(
            classifier=classifier, page_token=page_token, page_size=k or 0, label=label
        ),
        "ListClassifiers": pb.ListClassifiersRequest(page_token=page_token, page_size=k or 0),
        "ListLabels": pb.ListLabelsRequest(
            classifier=classifier, page_token=page_token, page_size=k or 0
        ),
        "DeleteExemplars": pb.DeleteExemplarsRequest(
            classifier=classifier, ids=pb.ExemplarIds(ids=texts)
        ),
        "UpdateClassifier": pb.UpdateClassifierRequest(
            classifier=pb.Classifier(
                name=classifier,
                k=k or 0,
                dimension=dimension or 0,
                voting=voting,  # type: ignore[arg-type]
                min_similarity=similarity or 0.0,
            ),
            update_mask=FieldMask(paths=texts),
        ),
        "CreateClassifier": pb.CreateClassifierRequest(
            name=classifier,
            instruction=label,
            k=k,
            voting=pb.Voting.ValueType(voting),
            min_confidence=similarity,
        ),
        "Evaluate": pb.EvaluateRequest(
            classifier=classifier,
            held_out_texts=[pb.LabelledText(text=t, label=label) for t in texts],
            k_values=[k] if k is not None else [],
            voting_methods=[voting],  # type: ignore[list-item]
        ),
    }
    for method, request in requests.items():
        code = status_of(channel, method, request.SerializeToString())
        assert code in DEFINED, (method, code)
    assert_healthy(channel)
