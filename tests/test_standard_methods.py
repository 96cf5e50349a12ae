"""UpdateClassifier (a field mask over the classifier's defaults) and GetServiceInfo."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.field_mask_pb2 import FieldMask
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from knn_classifier.client import Client, InvalidArgumentError, NotFoundError
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from .conftest import ServerThread


def test_update_changes_the_masked_fields_only(client: Client) -> None:
    created = client.create_classifier("c", k=5, min_similarity=0.1, temperature=0.05)
    updated = client.update_classifier("c", k=3, voting="softmax", min_confidence=0.4)
    assert (updated.k, updated.voting) == (3, pb.VOTING_SOFTMAX)
    assert updated.min_confidence == pytest.approx(0.4)
    assert updated.min_similarity == pytest.approx(created.min_similarity)
    assert updated.temperature == pytest.approx(created.temperature)
    assert updated.instruction == created.instruction
    assert client.get_classifier("c") == updated


def test_update_takes_effect_on_the_next_classify(client: Client) -> None:
    client.create_classifier("c", k=1, voting="majority")
    client.add_exemplars("c", [("alpha one", "a"), ("alpha two", "b"), ("alpha three", "b")])
    first = client.classify("c", "alpha one")
    assert len(first.scores) == 1
    client.update_classifier("c", k=3)
    assert len(client.classify("c", "alpha one").scores) == 2


def test_changing_how_votes_are_cast_drops_the_calibration(client: Client) -> None:
    client.create_classifier("c")
    client.add_exemplars(
        "c", [(f"{word} {i}", word) for word in ("apple", "pear", "plum") for i in range(6)]
    )
    assert client.evaluate("c", apply_best=True).classifier.calibrated
    assert client.update_classifier("c", min_confidence=0.2).calibrated
    assert not client.update_classifier("c", k=2).calibrated


@pytest.mark.parametrize(
    ("paths", "field", "reason", "message"),
    [
        ([], "update_mask", "FIELD_REQUIRED", "update_mask is empty"),
        (["instruction"], "update_mask.paths[0]", "FIELD_NOT_UPDATABLE", "every stored vector"),
        (["k", "name"], "update_mask.paths[1]", "FIELD_NOT_UPDATABLE", "name cannot change"),
        (["exemplar_count"], "update_mask.paths[0]", "FIELD_NOT_UPDATABLE", "output only"),
        (["colour"], "update_mask.paths[0]", "FIELD_NOT_UPDATABLE", "not a field"),
        # Fields of Classifier, output only: not "not a field of Classifier".
        (["calibration"], "update_mask.paths[0]", "FIELD_NOT_UPDATABLE", "output only"),
        (["out_of_scope_threshold"], "update_mask.paths[0]", "FIELD_NOT_UPDATABLE", "output only"),
    ],
)
def test_update_refuses_a_mask_it_cannot_apply(
    client: Client, server: ServerThread, paths: list[str], field: str, reason: str, message: str
) -> None:
    client.create_classifier("c", k=5)
    request = pb.UpdateClassifierRequest(
        classifier=pb.Classifier(name="c", k=7, instruction="another task"),
        update_mask=FieldMask(paths=paths),
    )
    with server.channel() as channel, pytest.raises(grpc.RpcError, match=message) as caught:
        pb_grpc.ClassifierServiceStub(channel).UpdateClassifier(request, timeout=10)
    status = rpc_status.from_call(caught.value)  # type: ignore[arg-type]
    assert status is not None
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    info, bad_request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert status.details[1].Unpack(bad_request)
    assert info.reason == reason
    assert [v.field for v in bad_request.field_violations] == [field]
    assert client.get_classifier("c").k == 5


def test_update_validates_the_new_values(client: Client) -> None:
    client.create_classifier("c")
    with pytest.raises(InvalidArgumentError, match="k=0") as caught:
        client.update_classifier("c", k=0)
    assert [v.field for v in caught.value.field_violations] == ["classifier.k"]
    with pytest.raises(InvalidArgumentError, match="dimension 32 is not configured"):
        client.update_classifier("c", dimension=32)
    assert client.update_classifier("c", dimension=16).dimension == 16
    assert client.update_classifier("c", dimension=0).dimension == 0
    with pytest.raises(NotFoundError):
        client.update_classifier("missing", k=3)


def test_service_info(client: Client) -> None:
    info = client.get_service_info()
    assert info.api_version == "v1"
    assert info.server_version
    assert list(info.dimensions) == [16, 64]
    assert (info.embedder.model, info.embedder.width) == ("fake", 64)
    assert info.limits.max_text_chars == 8192
    assert info.limits.max_batch_neighbours == 51_200
    assert info.limits.max_response_bytes == 4 * 1024 * 1024 - 64 * 1024
    assert info.limits.max_request_bytes == 32 * 1024 * 1024
