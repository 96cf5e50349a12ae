"""Embedder and store faults: each maps to a defined status, writes nothing, and heals itself."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from qdrant_client import AsyncQdrantClient
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from knn_classifier.client import DeadlineExceededError, UnavailableError
from knn_classifier.server.store.qdrant_server import QdrantServerStore

from .conftest import ServerThread, make_settings, wait_for
from .fake_embedder import FakeEmbeddingServer

EXEMPLARS = [("red apple fruit", "fruit"), ("green pear fruit", "fruit"), ("blue car road", "car")]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def health(server: ServerThread) -> int:
    with server.channel() as channel:
        request = health_pb2.HealthCheckRequest()
        return int(health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status)


def started(settings: Any) -> ServerThread:
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", EXEMPLARS)
    return running


@pytest.fixture
def served(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    """A server whose embedding calls are all the test's own (no health checks)."""
    running = started(make_settings(tmp_path, fake_embedder.base_url))
    yield running
    running.stop()


@pytest.fixture
def watched(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    """A server checking its dependencies' health every 0.1 s."""
    settings = make_settings(tmp_path, fake_embedder.base_url, server={"health_interval_s": 0.1})
    running = started(settings)
    yield running
    running.stop()


def test_429_is_retried(served: ServerThread, fake_embedder: FakeEmbeddingServer) -> None:
    fake_embedder.reset(fail_status=429, fail_times=1)
    with served.client() as client:
        assert client.classify("c", "red fruit").label == "fruit"
    assert fake_embedder.behaviour.calls == 2


def test_persistent_429_is_unavailable(
    served: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    fake_embedder.reset(fail_status=429, fail_times=100)
    with served.client() as client, pytest.raises(UnavailableError, match="429"):
        client.classify("c", "red fruit")


def test_a_hang_past_the_deadline_is_deadline_exceeded_and_writes_nothing(
    served: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    fake_embedder.reset(delay_s=2.0)
    with served.client() as client:
        with pytest.raises(DeadlineExceededError):
            client.add_exemplars("c", [("slow text", "slow")], timeout=0.5)
        fake_embedder.reset()
        assert "slow" not in client.list_labels("c")
        assert client.classify("c", "red fruit").label == "fruit"


def test_a_slow_answer_within_the_deadline_is_served(
    served: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    fake_embedder.reset(delay_s=0.4)
    with served.client() as client:
        assert client.classify("c", "blue road", timeout=5).label == "car"


def test_no_call_is_sent_once_the_deadline_has_passed(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    # One embedding call at a time, so the next request is sent only once the failing call has
    # given up; and retries enough to go on for minutes if the deadline did not stop them.
    embedding = {"max_concurrent_calls": 1, "retries": 10}
    running = started(make_settings(tmp_path, fake_embedder.base_url, embedding=embedding))
    try:
        behaviour = fake_embedder.reset(failing_texts={"red fruit"})
        with running.client() as client:
            with pytest.raises((UnavailableError, DeadlineExceededError)):
                client.classify("c", "red fruit", timeout=0.3)
            assert client.classify("c", "blue road", timeout=60).label == "car"
    finally:
        running.stop()
    # Backoffs last at least 0.1 s, then 0.2 s: a third attempt would start after the deadline.
    refused = behaviour.calls - len(behaviour.inputs)
    assert 1 <= refused <= 2
    assert behaviour.inputs == [["blue road"]]


def test_a_malformed_body_is_unavailable(
    served: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    fake_embedder.reset(malformed=True)
    with served.client() as client, pytest.raises(UnavailableError, match="malformed"):
        client.add_exemplars("c", [("new text", "new")])
    fake_embedder.reset()
    with served.client() as client:
        assert "new" not in client.list_labels("c")


def test_health_follows_the_embedder(
    watched: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    assert health(watched) == SERVING
    fake_embedder.reset(fail_status=500, fail_times=10**6)
    wait_for(lambda: health(watched) == NOT_SERVING)
    fake_embedder.reset()
    wait_for(lambda: health(watched) == SERVING)
    with watched.client() as client:
        assert client.classify("c", "green pear").label == "fruit"


class FlakyQdrant:
    """AsyncQdrantClient(":memory:") that raises real client exceptions while told to."""

    def __init__(self) -> None:
        self._client = AsyncQdrantClient(location=":memory:")
        self.failing: Callable[[str, tuple[Any, ...]], Exception | None] = lambda *_: None

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._client, name)
        if not callable(target):
            return target

        async def call(*args: Any, **kwargs: Any) -> Any:
            error = self.failing(name, args)
            if error is not None:
                raise error
            return await target(*args, **kwargs)

        return call


@pytest.fixture
def flaky(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> Iterator[tuple[ServerThread, FlakyQdrant]]:
    qdrant = FlakyQdrant()
    store = QdrantServerStore(qdrant, "knn")  # type: ignore[arg-type]
    settings = make_settings(tmp_path, fake_embedder.base_url, server={"health_interval_s": 0.1})
    running = ServerThread(settings, store).start()
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", EXEMPLARS)
    yield running, qdrant
    running.stop()


@pytest.mark.parametrize(
    "error",
    [
        ResponseHandlingException(ConnectionRefusedError("connection refused")),
        UnexpectedResponse(503, "Service Unavailable", b"{}", {}),  # type: ignore[arg-type]
        grpc.aio.AioRpcError(
            grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), None, None
        ),
    ],
    ids=["unreachable", "http-503", "grpc-unavailable"],
)
def test_store_down_is_unavailable_and_recovers(
    flaky: tuple[ServerThread, FlakyQdrant], error: Exception
) -> None:
    server, qdrant = flaky
    qdrant.failing = lambda *_: error
    with server.client() as client:
        with pytest.raises(UnavailableError, match="vector store"):
            client.classify("c", "red fruit")
        with pytest.raises(UnavailableError):
            client.add_exemplars("c", [("more text", "more")])
        wait_for(lambda: health(server) == NOT_SERVING)
        qdrant.failing = lambda *_: None
        wait_for(lambda: health(server) == SERVING)
        assert client.classify("c", "red fruit").label == "fruit"
        assert "more" not in client.list_labels("c")


def test_a_write_failing_in_one_dimension_leaves_no_half_written_exemplar(
    flaky: tuple[ServerThread, FlakyQdrant],
) -> None:
    server, qdrant = flaky

    def fail_upsert_of_widest(name: str, args: tuple[Any, ...]) -> Exception | None:
        if name == "upsert" and args and args[0] == "knn_d64":
            return ResponseHandlingException(TimeoutError("timed out"))
        return None

    qdrant.failing = fail_upsert_of_widest
    with server.client() as client:
        before = client.get_classifier("c").etag
        with pytest.raises(UnavailableError):
            client.add_exemplars("c", [("brand new", "new"), EXEMPLARS[0]])
        qdrant.failing = lambda *_: None
        # The narrow dimension held the points for a while: the revision moved, so no replica
        # keeps a label model fitted on them.
        assert client.get_classifier("c").etag != before
        for dimension in (16, 64):
            labels = client.classify("c", "brand new", dimension=dimension, k=10).scores
            assert "new" not in {s.label for s in labels}
        assert client.list_labels("c") == {"fruit": 2, "car": 1}


# Busy is not down: a busy replica must stay in rotation -----------------------------------

PROBE = "dimension probe"
"""The text of the health probe (embedding._PROBE_TEXT)."""


@contextmanager
def batch_in_flight(
    server: ServerThread, fake_embedder: FakeEmbeddingServer, held: set[str]
) -> Iterator[None]:
    """An AddExemplars of "a long batch" in flight: its embedding call, and every call with a
    text containing one of ``held``, waits at the fake's gate until the block ends."""
    gate = fake_embedder.hold()
    fake_embedder.behaviour.held_texts = {"long batch", *held}

    def add() -> None:
        with server.client() as client:
            client.add_exemplars("c", [("a long batch", "busy")])

    thread = threading.Thread(target=add, daemon=True)
    thread.start()
    try:
        yield
    finally:
        gate.set()
        thread.join(timeout=60)


def test_a_probe_queued_behind_a_busy_embedder_keeps_health_serving(
    watched: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    with batch_in_flight(watched, fake_embedder, held={PROBE}):
        fake_embedder.wait_for_held(2)  # the batch and a probe queued behind it
        with watched.client() as client:
            assert client.classify("c", "green pear pie").label == "fruit"  # answered meanwhile
        # The probe timed out (after 5 s) and its verdict was reported before the next probe.
        fake_embedder.wait_for_held(3)
        assert health(watched) == SERVING


def test_calls_in_flight_do_not_hide_a_down_embedder(
    watched: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    with batch_in_flight(watched, fake_embedder, held=set()):
        fake_embedder.wait_for_held(1)
        fake_embedder.behaviour.fail_status = 500
        fake_embedder.behaviour.fail_times = 10**6
        wait_for(lambda: health(watched) == NOT_SERVING, "health NOT_SERVING")
        fake_embedder.behaviour.fail_times = 0
    wait_for(lambda: health(watched) == SERVING, "health SERVING again")
    with watched.client() as client:
        assert client.classify("c", "green pear").label == "fruit"
