"""Machine-readable errors (AIP-193) through the real server, and the client's retry policy."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from knn_classifier.client import (
    AlreadyExistsError,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    KnnClassifierError,
    NotFoundError,
    RetryPolicy,
    UnavailableError,
)
from knn_classifier.server import errors, statuses
from knn_classifier.v1 import error_reason_pb2

from .conftest import ServerThread, raw_method
from .fake_embedder import FakeEmbeddingServer


def test_the_reasons_are_the_protos() -> None:
    in_proto = set(error_reason_pb2.ErrorReason.keys()) - {"ERROR_REASON_UNSPECIFIED"}
    assert {reason.value for reason in errors.Reason} == in_proto


class _StoreFull(errors.ResourceExhausted):
    """A subclass the status table does not name."""


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.EmbedderUnavailable("down"), grpc.StatusCode.UNAVAILABLE),
        (errors.Aborted("raced"), grpc.StatusCode.ABORTED),
        (_StoreFull("disk full"), grpc.StatusCode.RESOURCE_EXHAUSTED),
    ],
)
def test_a_subclass_keeps_its_parents_status(
    error: errors.ServiceError, code: grpc.StatusCode
) -> None:
    # The servicer used to look the exact type up: a subclass became UNKNOWN.
    assert statuses.code_of(error) == code


def test_aborted_is_not_retryable_by_default() -> None:
    status = statuses.of_error(errors.Aborted("a concurrent change conflicts"))
    info = error_details_pb2.ErrorInfo()
    assert status.code == grpc.StatusCode.ABORTED.value[0]
    assert [d.Unpack(info) for d in status.details] == [True]
    assert info.reason == "CONCURRENT_CHANGE"


def test_not_found_names_the_classifier(client: Client) -> None:
    with pytest.raises(NotFoundError) as caught:
        client.classify("missing", "hello")
    error = caught.value
    assert (error.reason, error.resource_name, error.retryable) == (
        "CLASSIFIER_NOT_FOUND",
        "missing",
        False,
    )


def test_already_exists_names_the_classifier(client: Client) -> None:
    client.create_classifier("taken")
    with pytest.raises(AlreadyExistsError) as caught:
        client.create_classifier("taken")
    assert (caught.value.reason, caught.value.resource_name) == (
        "CLASSIFIER_ALREADY_EXISTS",
        "taken",
    )


def test_bad_fields_are_named_with_their_path(client: Client) -> None:
    client.create_classifier("c")
    with pytest.raises(InvalidArgumentError) as caught:
        client.add_exemplars("c", [("fine", "a"), ("x" * 8193, "b")])
    error = caught.value
    assert error.reason == "TEXT_TOO_LONG"
    assert error.metadata == {"limitChars": "8192", "actualChars": "8193"}
    assert [(v.field, v.description) for v in error.field_violations] == [
        ("exemplars[1].text", "exemplars[1].text has 8193 characters; the limit is 8192")
    ]
    with pytest.raises(InvalidArgumentError) as caught:
        client.classify("c", "hi", k=0)
    assert caught.value.reason == "VALUE_OUT_OF_RANGE"
    assert caught.value.metadata == {"minimum": "1", "maximum": "200"}
    assert [v.field for v in caught.value.field_violations] == ["options.k"]


def test_an_empty_classifier_says_so(client: Client) -> None:
    client.create_classifier("empty")
    with pytest.raises(FailedPreconditionError) as caught:
        client.classify("empty", "hello")
    assert caught.value.reason == "CLASSIFIER_EMPTY"


def test_malformed_bytes_say_so(server: ServerThread) -> None:
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        raw_method(channel, "/knn_classifier.v1.ClassifierService/Classify")(b"\xff\xff", timeout=5)
    trailers: dict[str, Any] = dict(caught.value.trailing_metadata())  # type: ignore[arg-type]
    status = status_pb2.Status.FromString(trailers["grpc-status-details-bin"])
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (status.code, info.reason) == (
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        "MALFORMED_REQUEST",
    )


def test_an_embedder_outage_is_retryable_and_says_which_dependency(
    server: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    fake_embedder.behaviour.fail_status = 500
    fake_embedder.behaviour.fail_times = 100
    with Client(server.address, retry=RetryPolicy(max_attempts=1)) as client:
        client.create_classifier("c")
        with pytest.raises(UnavailableError) as caught:
            client.add_exemplars("c", [("hello", "a")])
    error = caught.value
    assert (error.reason, error.retry_delay, error.retryable) == ("EMBEDDER_UNAVAILABLE", 1.0, True)


# The client's retry policy ------------------------------------------------------------------


@pytest.fixture
def flaky(client: Client, fake_embedder: FakeEmbeddingServer) -> FakeEmbeddingServer:
    """A classifier with exemplars, and an embedder whose next call fails with HTTP 500 (which
    the server does not retry: the call fails UNAVAILABLE with a retry delay of 1 s)."""
    client.create_classifier("c")
    client.add_exemplars("c", [("hello there", "greeting"), ("goodbye now", "farewell")])
    fake_embedder.behaviour.fail_status = 500
    fake_embedder.behaviour.fail_times = 1
    return fake_embedder


def test_an_idempotent_call_is_retried_after_the_servers_delay(
    client: Client, flaky: FakeEmbeddingServer
) -> None:
    before = flaky.behaviour.calls
    assert client.classify("c", "hello").label == "greeting"
    assert flaky.behaviour.calls == before + 2


def test_a_call_that_is_not_idempotent_is_not_retried(
    client: Client, flaky: FakeEmbeddingServer
) -> None:
    before = flaky.behaviour.calls
    with pytest.raises(UnavailableError):
        client.evaluate("c", held_out=[("hello", "greeting"), ("bye", "farewell")])
    assert flaky.behaviour.calls == before + 1


def test_retries_can_be_turned_off(server: ServerThread, flaky: FakeEmbeddingServer) -> None:
    before = flaky.behaviour.calls
    with (
        Client(server.address, retry=RetryPolicy(max_attempts=1)) as once,
        pytest.raises(UnavailableError),
    ):
        once.classify("c", "hello")
    assert flaky.behaviour.calls == before + 1


def test_a_transport_failure_is_retryable() -> None:
    with (
        Client("127.0.0.1:1", timeout=2, retry=RetryPolicy(initial_backoff_s=0.01)) as nowhere,
        pytest.raises(UnavailableError) as caught,
    ):
        nowhere.list_classifiers()
    assert (caught.value.reason, caught.value.retryable) == ("", True)


def _error(
    retry_delay: float | None, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
) -> KnnClassifierError:
    return KnnClassifierError(code, "x", reason="STORE_UNAVAILABLE", retry_delay=retry_delay)


def test_the_retry_policy() -> None:
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1, max_backoff_s=5.0)
    # The server's delay is the least wait; the attempts and the deadline bound the retries.
    assert policy.delay(0, _error(1.0), time_left=10.0) == pytest.approx(1.0)
    assert 0.0 <= (policy.delay(1, _error(0.0), time_left=10.0) or -1) <= 0.2
    assert policy.delay(2, _error(1.0), time_left=10.0) is None
    assert policy.delay(0, _error(1.0), time_left=0.5) is None
    # No retry hint, and not a transport failure: not retried.
    assert policy.delay(0, _error(None), time_left=10.0) is None
    invalid = KnnClassifierError(grpc.StatusCode.INVALID_ARGUMENT, "x", reason="INVALID_REQUEST")
    assert policy.delay(0, invalid, time_left=10.0) is None


def test_the_readme_error_table_gives_every_reason_its_status() -> None:
    """Each reason in the README's table, under the status its proto comment names."""
    root = Path(__file__).resolve().parents[1]
    in_proto: dict[str, str] = {}
    status = ""
    for line in (root / "proto/knn_classifier/v1/error_reason.proto").read_text().splitlines():
        if tagged := re.match(r"\s*// \[([A-Z_]+)\]", line):
            status = tagged.group(1)
        elif value := re.match(r"\s*([A-Z_]+) = \d+;", line):
            in_proto[value.group(1)] = status
    in_proto.pop("ERROR_REASON_UNSPECIFIED")
    readme = (root / "README.md").read_text()
    table = readme.split("\n## Errors\n", 1)[1].split("\n\n|", 1)[1].split("\n\n", 1)[0]
    in_readme = {
        reason: row.split("|")[1].strip()
        for row in table.splitlines()[2:]
        for reason in re.findall(r"`([A-Z_]+)`", row.split("|")[2])
    }
    assert in_readme == in_proto
