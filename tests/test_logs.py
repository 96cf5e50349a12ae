"""Structured logs and the access log of the real server: a process for the JSON lines, in-process
for the rest."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from knn_classifier.server import logs
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc

from .conftest import ServerThread, make_settings, wait_for
from .fake_embedder import FakeEmbeddingServer

KEY = "key-that-must-never-be-logged"
SECRET_TEXT = "a text that must never be logged above debug"
SERVICE = "knn_classifier.v1.ClassifierService"


class JsonServer:
    """``python -m knn_classifier.server`` with JSON logs; its stderr lines are collected."""

    def __init__(self, data_dir: Path, base_url: str) -> None:
        env = {
            **os.environ,
            "KNN_DATA_DIR": str(data_dir),
            "KNN_DIMENSIONS": "16,64",
            "KNN_EMBEDDING__BASE_URL": base_url,
            "KNN_EMBEDDING__MODEL": "fake",
            "KNN_EMBEDDING__TEMPLATE": "{text}",
            "KNN_EMBEDDING__CACHE_FILE": "false",
            "KNN_SERVER__PORT": "0",
            "KNN_AUTH__WRITE_KEYS": KEY,
            "KNN_LOG_FORMAT": "json",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "knn_classifier.server"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.put(line)

    def wait_for_port(self) -> tuple[int, list[str]]:
        seen: list[str] = []
        while True:
            line = self.lines.get(timeout=60)
            seen.append(line)
            found = re.search(r"serving \S+ on [\d.]+:(\d+)", line)
            if found:
                return int(found.group(1)), seen

    def stop(self) -> list[str]:
        self.process.terminate()
        self.process.wait(timeout=30)
        self._reader.join(timeout=30)
        assert self.process.stderr is not None
        self.process.stderr.close()
        rest: list[str] = []
        while not self.lines.empty():
            rest.append(self.lines.get())
        return rest


@pytest.fixture
def json_server(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[JsonServer]:
    server = JsonServer(tmp_path / "data", fake_embedder.base_url)
    yield server
    if server.process.poll() is None:
        server.stop()


def test_json_lines_with_one_access_line_per_rpc_and_no_keys_or_texts(
    json_server: JsonServer,
) -> None:
    port, lines = json_server.wait_for_port()
    auth = (("authorization", f"Bearer {KEY}"),)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
        stub.CreateClassifier(pb.CreateClassifierRequest(name="support"), metadata=auth)
        stub.AddExemplars(
            pb.AddExemplarsRequest(
                classifier="support",
                exemplars=[
                    pb.ExemplarInput(text=SECRET_TEXT, label="secret"),
                    pb.ExemplarInput(text="top up my account", label="top_up"),
                ],
            ),
            metadata=auth,
        )
        _, classified = stub.Classify.with_call(
            pb.ClassifyRequest(classifier="support", text=SECRET_TEXT),
            metadata=(*auth, ("x-request-id", "caller-chose-this-id")),
        )
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListClassifiers(
                pb.ListClassifiersRequest(), metadata=(("authorization", "Bearer wrong-key"),)
            )
    lines += json_server.stop()

    output = "".join(lines)
    assert KEY not in output
    assert "wrong-key" not in output
    assert SECRET_TEXT not in output
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    for record in records:
        assert {"timestamp", "level", "logger", "message"} <= set(record)
    access = [r for r in records if r["logger"] == "knn_classifier.access"]
    assert [(r["rpc"], r["status"]) for r in access] == [
        (f"{SERVICE}/CreateClassifier", "OK"),
        (f"{SERVICE}/AddExemplars", "OK"),
        (f"{SERVICE}/Classify", "OK"),
        (f"{SERVICE}/ListClassifiers", "UNAUTHENTICATED"),
    ]
    create, add, classify, denied = access
    assert (create["classifier"], create["texts"]) == ("support", 0)
    assert (add["classifier"], add["texts"]) == ("support", 2)
    assert (classify["classifier"], classify["texts"]) == ("support", 1)
    assert all(r["level"] == "INFO" and r["duration_ms"] >= 0 for r in access)
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in access)
    # The caller's request id is used and returned; otherwise one is made and returned.
    assert classify["request_id"] == "caller-chose-this-id"
    assert ("x-request-id", "caller-chose-this-id") in classified.trailing_metadata()
    made = str(dict(cast(grpc.Call, refused.value).trailing_metadata())["x-request-id"])
    assert denied["request_id"] == made
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    assert len({r["request_id"] for r in access}) == 4


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "knn_classifier.access"]


def test_health_checks_log_at_debug_and_the_access_log_can_be_turned_off(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG", logger="knn_classifier.access")
    for access_log, expected in ((True, ["DEBUG", "INFO"]), (False, [])):
        caplog.clear()
        running = ServerThread(
            make_settings(tmp_path / str(access_log), fake_embedder.base_url, access_log=access_log)
        ).start()
        try:
            with running.channel() as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            with running.client() as client:
                client.list_classifiers()
        finally:
            running.stop()
        assert [r.levelname for r in access_records(caplog)] == expected


def test_a_request_id_that_is_not_printable_ascii_is_replaced(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="knn_classifier.access")
    with server.channel() as channel:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
        _, call = stub.ListClassifiers.with_call(
            pb.ListClassifiersRequest(), metadata=(("x-request-id", "two words"),)
        )
    returned = str(dict(call.trailing_metadata())["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", returned)
    assert [getattr(r, "request_id", None) for r in access_records(caplog)] == [returned]


def test_a_classifier_name_cannot_forge_a_text_log_line(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="knn_classifier.access")
    forged = "x\n2030-01-01 00:00:00 INFO knn_classifier.access: forged"
    with server.channel() as channel:
        stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
        with pytest.raises(grpc.RpcError):
            stub.GetClassifier(pb.GetClassifierRequest(name=forged))
    wait_for(lambda: len(access_records(caplog)) == 1)  # written as the refused call ends
    (record,) = access_records(caplog)
    assert "\n" not in record.getMessage()
    assert (
        getattr(record, "classifier", None)
        == "x\\n2030-01-01 00:00:00 INFO knn_classifier.access: forged"
    )


class RequestIds(logging.Handler):
    """Notes the request id in context when each record is emitted (as the JSON lines show it)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[tuple[str, str | None]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append((record.getMessage(), logs.request_id.get()))


def test_the_shared_embedding_worker_does_not_log_under_another_callers_request_id(
    server: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    ids = RequestIds()
    logging.getLogger("knn_classifier.server.embedding").addHandler(ids)
    try:
        with server.channel() as channel:
            stub = classifier_pb2_grpc.ClassifierServiceStub(channel)
            stub.CreateClassifier(pb.CreateClassifierRequest(name="c"))
            stub.AddExemplars(
                pb.AddExemplarsRequest(
                    classifier="c", exemplars=[pb.ExemplarInput(text="top up", label="t")]
                )
            )
            # The first Classify starts the coalescer's worker; the second one's call is
            # retried there, and the retry's warning must not carry the first caller's id.
            for request_id in ("first-caller", "second-caller"):
                stub.Classify(
                    pb.ClassifyRequest(classifier="c", text=f"top up {request_id}"),
                    metadata=(("x-request-id", request_id),),
                )
                fake_embedder.reset(fail_status=503, fail_times=1)
    finally:
        logging.getLogger("knn_classifier.server.embedding").removeHandler(ids)
    (retry,) = [seen for seen in ids.seen if "retry" in seen[0]]
    assert retry[1] != "first-caller"
