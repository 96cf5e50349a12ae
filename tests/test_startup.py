"""Start-up: file settings checked first, the port bound before the embedder is waited for, IPv6.

The subprocess tests run ``python -m knn_classifier.server`` against an embedder URL where
nothing listens and a start-up timeout of an hour: a process that exits at all within the
(generous) subprocess timeout did not wait for the embedder.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from pydantic import ValidationError

from knn_classifier.client import Client, UnavailableError
from knn_classifier.server.app import SERVICE_NAME, App
from knn_classifier.server.errors import StartupError
from knn_classifier.server.settings import ServerSettings, Settings

from .certificates import make_ca, make_leaf
from .conftest import ServerThread, make_settings, wait_for
from .fake_embedder import FakeEmbeddingServer
from .test_embedding import free_port

T = TypeVar("T")
NOWHERE = "http://127.0.0.1:9/v1"  # never contacted by the tests that use it
ONE_HOUR = "3600"


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, Path]:
    """A CA, a server certificate and its key, and the key of another certificate."""
    ca, ca_key, ca_certificate = make_ca()
    server = make_leaf(ca_key, ca_certificate, "localhost")
    other = make_leaf(ca_key, ca_certificate, "other")
    files = {"ca": ca.certificate, "cert": server.certificate, "key": server.key}
    files["other_key"] = other.key
    files["junk"] = b"this is not PEM\n"
    files["encrypted_key"] = serialization.load_pem_private_key(server.key, None).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    paths = {}
    for name, data in files.items():
        paths[name] = tmp_path / f"{name}.pem"
        paths[name].write_bytes(data)
    paths["missing"] = tmp_path / "missing.pem"
    paths["directory"] = tmp_path
    return paths


# A bad file setting stops construction, before any embedder call or store access -------------


def bad_tls(files: dict[str, Path], cert: str, key: str, ca: str | None = None) -> dict[str, Any]:
    tls = {"cert_file": files[cert], "key_file": files[key]}
    if ca is not None:
        tls["client_ca_file"] = files[ca]
    return {"tls": tls}


@pytest.mark.parametrize(
    ("cert", "key", "ca", "message"),
    [
        ("missing", "key", None, "KNN_TLS__CERT_FILE={missing}: cannot read it"),
        ("cert", "missing", None, "KNN_TLS__KEY_FILE={missing}: cannot read it"),
        ("cert", "directory", None, "KNN_TLS__KEY_FILE={directory}: cannot read it"),
        ("cert", "key", "missing", "KNN_TLS__CLIENT_CA_FILE={missing}: cannot read it"),
        ("cert", "key", "junk", "KNN_TLS__CLIENT_CA_FILE={junk}: no PEM certificate"),
        ("junk", "key", None, "KNN_TLS__CERT_FILE={junk}: no PEM certificate"),
        ("key", "key", None, "KNN_TLS__CERT_FILE={key}: no PEM certificate"),
        ("cert", "junk", None, "KNN_TLS__KEY_FILE={junk}: no PEM private key"),
        ("cert", "cert", None, "KNN_TLS__KEY_FILE={cert}: no PEM private key"),
        (
            "cert",
            "other_key",
            None,
            "KNN_TLS__KEY_FILE={other_key}: not the private key of the certificate in "
            "KNN_TLS__CERT_FILE={cert}",
        ),
        ("cert", "encrypted_key", None, "KNN_TLS__KEY_FILE={encrypted_key}: the key is encrypted"),
    ],
)
async def test_a_bad_tls_file_names_the_setting_and_the_path(
    tmp_path: Path,
    tls_files: dict[str, Path],
    cert: str,
    key: str,
    ca: str | None,
    message: str,
) -> None:
    settings = make_settings(tmp_path / "data", NOWHERE, **bad_tls(tls_files, cert, key, ca))
    with pytest.raises(StartupError, match=re.escape(message.format(**tls_files))):
        App(settings)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read it (No such file or directory)"),
        ("", "no keys in it"),
        ("# only a comment\n", "no keys in it"),
        (f"{'ab' * 32} write\nnot-hex read\n", "line 2: expected '<sha256 hex> read|write'"),
        (f"{'ab' * 32} admin\n", "line 1: expected '<sha256 hex> read|write'"),
        (f"{'ab' * 32} read write\n", "line 1: expected '<sha256 hex> read|write'"),
        ("abcd read\n", "line 1: not a SHA-256 digest"),
    ],
)
async def test_a_bad_keys_file_names_the_setting_and_the_line(
    tmp_path: Path, content: str | None, message: str
) -> None:
    keys = tmp_path / "keys"
    if content is not None:
        keys.write_text(content)
    settings = make_settings(tmp_path / "data", NOWHERE, auth={"keys_file": keys})
    with pytest.raises(StartupError, match=re.escape(f"KNN_AUTH__KEYS_FILE={keys}: {message}")):
        App(settings)


# The entry point: one line, no traceback, no wait for the embedder ---------------------------


def run_server(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Runs the service as a process until it exits; the embedder it waits for never answers."""
    return subprocess.run(
        [sys.executable, "-m", "knn_classifier.server"],
        env={
            **os.environ,
            "KNN_DATA_DIR": str(tmp_path / "data"),
            "KNN_EMBEDDING__BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
            "KNN_EMBEDDING__STARTUP_TIMEOUT_S": ONE_HOUR,
            "KNN_SERVER__PORT": str(free_port()),
            **env,
        },
        capture_output=True,
        text=True,
        timeout=300,  # far below the hour the embedder would be waited for
        check=False,
    )


def assert_one_line_refusal(done: subprocess.CompletedProcess[str], message: str) -> None:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == f"knn-classifier cannot start: {message}", done.stderr


def test_python_m_refuses_a_missing_tls_key_at_once(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    done = run_server(
        tmp_path,
        KNN_TLS__CERT_FILE=str(tls_files["cert"]),
        KNN_TLS__KEY_FILE=str(tls_files["missing"]),
    )
    assert_one_line_refusal(
        done,
        f"KNN_TLS__KEY_FILE={tls_files['missing']}: cannot read it (No such file or directory)",
    )


def test_python_m_refuses_a_key_of_another_certificate_at_once(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    done = run_server(
        tmp_path,
        KNN_TLS__CERT_FILE=str(tls_files["cert"]),
        KNN_TLS__KEY_FILE=str(tls_files["other_key"]),
    )
    assert_one_line_refusal(
        done,
        f"KNN_TLS__KEY_FILE={tls_files['other_key']}: not the private key of the certificate "
        f"in KNN_TLS__CERT_FILE={tls_files['cert']}",
    )


def test_python_m_refuses_a_malformed_keys_file_at_once(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"{hashlib.sha256(b'k').hexdigest()} write\noops\n")
    done = run_server(tmp_path, KNN_AUTH__KEYS_FILE=str(keys))
    assert_one_line_refusal(
        done, f"KNN_AUTH__KEYS_FILE={keys}: line 2: expected '<sha256 hex> read|write'"
    )


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        (
            {"KNN_LIMITS__MAX_K": "-3"},
            "KNN_LIMITS__MAX_K: Input should be greater than or equal to 1",
        ),
        ({"KNN_DEFAULTS__K": "500"}, "defaults.k=500 exceeds limits.max_k=200"),
    ],
)
def test_python_m_names_invalid_settings_without_quoting_values(
    tmp_path: Path, env: dict[str, str], problem: str
) -> None:
    """One line per problem naming the variable; pydantic's text quoted the values given, the
    API keys among them (the first characters of one, cut), and linked its documentation."""
    done = run_server(tmp_path, KNN_STORE__API_KEY="qz9-secret-key", **env)
    assert done.returncode == 1
    assert done.stderr == f"invalid settings:\n  {problem}\n"


def test_python_m_refuses_an_occupied_port_at_once(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    first = ServerThread(make_settings(tmp_path / "first", fake_embedder.base_url)).start()
    try:
        done = run_server(tmp_path, KNN_SERVER__PORT=str(first.port))
        with first.client() as client:
            assert client.list_classifiers() == []  # the first instance is untouched
    finally:
        first.stop()
    assert_one_line_refusal(
        done,
        f"cannot listen on 127.0.0.1:{first.port} (Address already in use); another process, "
        "perhaps another knn-classifier, listens there: stop it or set KNN_SERVER__PORT",
    )


# Ports and addresses -----------------------------------------------------------------------


def test_a_second_instance_on_an_occupied_port_refuses_to_start(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    first = ServerThread(make_settings(tmp_path / "first", fake_embedder.base_url)).start()
    try:
        second = make_settings(
            tmp_path / "second", fake_embedder.base_url, server={"port": first.port}
        )
        with pytest.raises(StartupError, match=rf"cannot listen on 127\.0\.0\.1:{first.port} "):
            ServerThread(second).start()
        with first.client() as client:
            client.create_classifier("only-here")
            assert [c.name for c in client.list_classifiers()] == ["only-here"]
    finally:
        first.stop()


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1)")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_listens_on_ipv6_loopback(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, host: str
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, server={"host": host})
    running = ServerThread(settings).start()
    try:
        with Client(f"[::1]:{running.port}", timeout=30) as client:
            client.create_classifier("v6")
            client.add_exemplars("v6", [("hello there", "greeting")])
            assert client.classify("v6", "hello").label == "greeting"
    finally:
        running.stop()


def test_ipv6_loopback_needs_no_keys_with_or_without_brackets() -> None:
    for host in ("::1", "[::1]"):
        server = Settings(server={"host": host}).server
        assert (server.host, server.address) == ("::1", "[::1]:50051")
    with pytest.raises(ValidationError, match="KNN_AUTH__WRITE_KEYS"):
        Settings(server={"host": "[::]"})
    with pytest.raises(ValidationError, match=r"\[nonsense\] is not an IPv6 address"):
        Settings(server={"host": "[nonsense]"})
    assert ServerSettings(host="0.0.0.0", port=7).address == "0.0.0.0:7"
    assert ServerSettings(host="localhost").address == "localhost:50051"


# Listening while the service starts -----------------------------------------------------------


class EventLoopThread:
    """An event loop in a thread, so that a test can talk to a server that is still starting."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def submit(self, coroutine: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def loop_thread() -> Iterator[EventLoopThread]:
    running = EventLoopThread()
    yield running
    running.close()


def health_status(channel: grpc.Channel) -> int:
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=10).status


def test_health_and_unavailable_while_the_embedder_is_awaited(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, loop_thread: EventLoopThread
) -> None:
    embedder = fake_embedder.reset(fail_status=503, fail_times=10**9)
    settings = make_settings(
        tmp_path, fake_embedder.base_url, embedding={"startup_timeout_s": float(ONE_HOUR)}
    )

    async def build() -> App:
        return App(settings)  # grpc.aio objects belong to the loop that creates them

    app = loop_thread.submit(build()).result(timeout=60)
    port = loop_thread.submit(app.listen()).result(timeout=60)
    starting = loop_thread.submit(app.start())
    try:
        wait_for(lambda: embedder.calls >= 2, "the embedder probe to be refused twice")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
            services = ProtoReflectionDescriptorDatabase(channel).get_services()
            assert SERVICE_NAME in services
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            with pytest.raises(UnavailableError, match="the service is starting") as refused:
                client.list_classifiers()
            assert refused.value.reason == "SERVICE_STARTING"
            assert refused.value.retry_delay is not None
            with pytest.raises(UnavailableError, match="the service is starting"):
                client.classify("any", "text")
        assert not starting.done()

        embedder.fail_times = 0
        assert starting.result(timeout=60) == port
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        with Client(f"127.0.0.1:{port}", timeout=30) as client:
            client.create_classifier("ready")
            assert [c.name for c in client.list_classifiers()] == ["ready"]
    finally:
        embedder.fail_times = 0
        starting.result(timeout=60)
        loop_thread.submit(app.stop(grace=0)).result(timeout=60)


def test_a_failed_start_up_stops_listening(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, loop_thread: EventLoopThread
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 128])

    async def build() -> App:
        return App(settings)

    app = loop_thread.submit(build()).result(timeout=60)
    port = loop_thread.submit(app.listen()).result(timeout=60)
    with pytest.raises(StartupError, match=r"dimensions \[128\] exceed the width 64"):
        loop_thread.submit(app.start()).result(timeout=60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # free again
