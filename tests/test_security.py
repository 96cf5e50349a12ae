"""API keys, TLS and limits, through the real server and the client package."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pydantic import ValidationError

from knn_classifier.client import (
    AsyncClient,
    Client,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    Tls,
    UnauthenticatedError,
    UnavailableError,
)
from knn_classifier.server.auth import OPEN_PREFIX, READ_METHODS, WRITE_METHODS
from knn_classifier.server.settings import Settings
from knn_classifier.v1 import classifier_pb2 as pb

from .certificates import make_ca, make_leaf
from .conftest import ServerThread, make_settings, raw_method
from .fake_embedder import FakeEmbeddingServer

WRITE_KEY = "write-key-0123456789"
READ_KEY = "read-key-9876543210"


@pytest.fixture
def secured(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    settings = make_settings(
        tmp_path,
        fake_embedder.base_url,
        auth={"write_keys": [WRITE_KEY], "read_keys": [READ_KEY]},
    )
    running = ServerThread(settings).start()
    yield running
    running.stop()


def test_write_key_does_everything_read_key_only_reads(secured: ServerThread) -> None:
    with Client(secured.address, api_key=WRITE_KEY) as writer:
        writer.create_classifier("c")
        writer.add_exemplars("c", [("hello there", "greeting"), ("bye now", "farewell")])
    with Client(secured.address, api_key=READ_KEY) as reader:
        assert reader.classify("c", "hello").label == "greeting"
        assert reader.list_labels("c") == {"greeting": 1, "farewell": 1}
        assert [c.name for c in reader.list_classifiers()] == ["c"]
        assert reader.check_exemplars("c").exemplar_count == 2  # a report changes nothing
        with pytest.raises(PermissionDeniedError, match="read-only; AddExemplars needs a write"):
            reader.add_exemplars("c", [("more", "x")])
        with pytest.raises(PermissionDeniedError):
            reader.delete_classifier("c")
        with pytest.raises(PermissionDeniedError):
            reader.evaluate("c")
    with Client(secured.address, api_key=WRITE_KEY) as writer:
        assert writer.list_labels("c") == {"greeting": 1, "farewell": 1}


def test_a_read_key_may_use_reflection_and_read_the_service_info(secured: ServerThread) -> None:
    with Client(secured.address, api_key=READ_KEY) as reader:
        assert reader.get_service_info().api_version == "v1"
        with pytest.raises(PermissionDeniedError) as caught:
            reader.update_classifier("c", k=3)
        assert caught.value.reason == "WRITE_KEY_REQUIRED"
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with secured.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = list(
            stub.ServerReflectionInfo(
                iter([request]), timeout=5, metadata=[("authorization", f"Bearer {READ_KEY}")]
            )
        )
    names = {s.name for s in responses[0].list_services_response.service}
    assert "knn_classifier.v1.ClassifierService" in names


def test_reflection_needs_a_key(secured: ServerThread) -> None:
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with secured.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("key", [None, "wrong-key", READ_KEY + "x", ""])
def test_missing_or_unknown_key_is_unauthenticated(secured: ServerThread, key: str | None) -> None:
    with (
        Client(secured.address, api_key=key) as client,
        pytest.raises(UnauthenticatedError) as caught,
    ):
        client.list_classifiers()
    assert caught.value.reason == "API_KEY_INVALID"


def test_health_needs_no_key(secured: ServerThread) -> None:
    with secured.channel() as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_file_of_hashes(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    keys = tmp_path / "keys"
    digest = hashlib.sha256(b"from-a-file").hexdigest()
    keys.write_text(f"# ops team\n{digest} write\n")
    settings = make_settings(tmp_path / "d", fake_embedder.base_url, auth={"keys_file": keys})
    running = ServerThread(settings).start()
    try:
        with Client(running.address, api_key="from-a-file") as client:
            client.create_classifier("ok")
        # The digest itself is not a key.
        with Client(running.address, api_key=digest) as client, pytest.raises(UnauthenticatedError):
            client.list_classifiers()
    finally:
        running.stop()


def test_keys_never_reach_the_log(secured: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret_text = "a-text-that-must-not-be-logged"
    with Client(secured.address, api_key=WRITE_KEY) as client:
        client.create_classifier("logged")
        client.add_exemplars("logged", [(secret_text, "x"), ("other words", "y")])
        client.classify("logged", secret_text)
    with (
        Client(secured.address, api_key="not-a-key") as client,
        pytest.raises(UnauthenticatedError),
    ):
        client.classify("logged", secret_text)
    assert WRITE_KEY not in caplog.text
    assert "not-a-key" not in caplog.text
    info_and_up = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.INFO)
    assert secret_text not in info_and_up


def test_listening_beyond_loopback_needs_keys_or_a_trusted_proxy() -> None:
    with pytest.raises(ValidationError, match="KNN_AUTH__WRITE_KEYS"):
        Settings(server={"host": "0.0.0.0"})
    assert Settings(server={"host": "0.0.0.0"}, auth={"write_keys": "k1,k2"}).auth.enabled
    assert Settings(server={"host": "0.0.0.0", "trusted_proxy": True}).server.trusted_proxy
    assert Settings(server={"host": "::1"}).server.host == "::1"


def tls_server(tmp_path: Path, base_url: str, mutual: bool) -> tuple[ServerThread, bytes, Tls]:
    ca, ca_key, ca_certificate = make_ca()
    server = make_leaf(ca_key, ca_certificate, "localhost")
    client = make_leaf(ca_key, ca_certificate, "client")
    for name, data in [
        ("ca.pem", ca.certificate),
        ("cert.pem", server.certificate),
        ("key.pem", server.key),
    ]:
        (tmp_path / name).write_bytes(data)
    tls = {"cert_file": tmp_path / "cert.pem", "key_file": tmp_path / "key.pem"}
    if mutual:
        tls["client_ca_file"] = tmp_path / "ca.pem"
    running = ServerThread(make_settings(tmp_path / "data", base_url, tls=tls)).start()
    return running, ca.certificate, Tls(ca.certificate, client.key, client.certificate)


def test_tls(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    running, ca, _ = tls_server(tmp_path, fake_embedder.base_url, mutual=False)
    try:
        target = f"localhost:{running.port}"
        with Client(target, tls=Tls(root_certificates=ca)) as client:
            client.create_classifier("secure")
            assert [c.name for c in client.list_classifiers()] == ["secure"]
        with Client(target, timeout=3) as plain, pytest.raises(UnavailableError):
            plain.list_classifiers()
    finally:
        running.stop()


def test_mutual_tls_needs_a_client_certificate(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    running, ca, with_certificate = tls_server(tmp_path, fake_embedder.base_url, mutual=True)
    try:
        target = f"localhost:{running.port}"
        with Client(target, tls=with_certificate) as client:
            client.create_classifier("mutual")
        without = Tls(root_certificates=ca)
        with Client(target, tls=without, timeout=3) as client, pytest.raises(UnavailableError):
            client.list_classifiers()
    finally:
        running.stop()


def test_exemplars_per_classifier_limit(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    settings = make_settings(
        tmp_path, fake_embedder.base_url, limits={"max_exemplars_per_classifier": 5}
    )
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("small")
            client.add_exemplars("small", [(f"text {i}", "a") for i in range(4)])
            with pytest.raises(ResourceExhaustedError, match="limit of 5 exemplars") as caught:
                client.add_exemplars("small", [("text 8", "a"), ("text 9", "b")])
            assert (caught.value.reason, caught.value.retryable) == (
                "EXEMPLAR_LIMIT_REACHED",
                False,
            )
            assert caught.value.metadata == {"limit": "5", "held": "4", "adding": "2"}
            assert client.get_classifier("small").exemplar_count == 4
    finally:
        running.stop()


def test_message_size_limit(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, limits={"max_request_bytes": 4096})
    running = ServerThread(settings).start()
    try:
        with running.channel() as channel:
            stub_call = raw_method(channel, "/knn_classifier.v1.ClassifierService/ListClassifiers")
            with pytest.raises(grpc.RpcError) as caught:
                stub_call(b"\x0a" + b"\x80\x40" + b"x" * 8192, timeout=5)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        running.stop()


def test_concurrent_call_limit(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, limits={"max_concurrent_rpcs": 2})
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("busy")
            client.add_exemplars("busy", [("alpha words", "a"), ("beta words", "b")])
        fake_embedder.reset(delay_s=0.4)

        async def burst(retry: RetryPolicy) -> list[object]:
            async with AsyncClient(running.address, retry=retry) as client:
                calls = [client.classify("busy", f"alpha {i}") for i in range(6)]
                return await asyncio.gather(*calls, return_exceptions=True)

        answers = asyncio.run(burst(RetryPolicy(max_attempts=1)))
        refused = [a for a in answers if isinstance(a, ResourceExhaustedError)]
        assert refused
        assert len(refused) < len(answers)
        assert {(e.reason, e.retryable) for e in refused} == {("TOO_MANY_CALLS", True)}
        # The client's default policy retries overload, and only overload, until served.
        retried = asyncio.run(burst(RetryPolicy(max_attempts=100, max_backoff_s=0.5)))
        assert all(isinstance(a, pb.Prediction) for a in retried), retried
    finally:
        running.stop()


def test_every_method_the_server_serves_is_open_a_read_or_a_write_method(
    server: ServerThread,
) -> None:
    """Read keys are refused only the methods auth knows as write methods: a servicer added
    without classing its methods would be open to read keys."""
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    services = [s.name for s in responses[0].list_services_response.service]
    assert "knn_classifier.v1.ClassifierService" in services
    served = {
        f"/{name}/{method.name}"
        for name in services
        for method in descriptor_pool.Default().FindServiceByName(name).methods
    }
    unclassed = {m for m in served - READ_METHODS - WRITE_METHODS if not m.startswith(OPEN_PREFIX)}
    assert unclassed == set()
