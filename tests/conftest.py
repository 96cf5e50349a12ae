"""Shared fixtures: the fake embedder, settings, and the real gRPC server in a background thread."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.client import BatchResult, Client, KnnClassifierError, Prediction
from knn_classifier.server.app import App
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import Store
from knn_classifier.server.store.qdrant_server import QdrantServerStore

from .fake_embedder import FakeEmbeddingServer


def shared_data_dir() -> Path:
    """The shared labelled data sets: $KNN_SHARED_DATA, else ../shared/data beside the checkout."""
    candidates = [
        os.environ.get("KNN_SHARED_DATA", ""),
        str(Path(__file__).resolve().parents[2] / "shared" / "data"),
        "/work/shared/data",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "banking77").is_dir():
            return Path(candidate)
    raise FileNotFoundError(f"shared data not found in {candidates}; set KNN_SHARED_DATA")


def raw_method(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    """``method`` called with bytes as they go on the wire, bypassing the generated stub."""
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def predictions(results: Sequence[BatchResult]) -> list[Prediction]:
    """The predictions of a classify_batch; a text's error, if any, is raised."""
    found = []
    for result in results:
        if isinstance(result, KnnClassifierError):
            raise result
        found.append(result)
    return found


def wait_for(
    condition: Callable[[], bool], what: str = "the condition", seconds: float = 60
) -> None:
    """Polls ``condition`` until it holds; fails the test if it does not within ``seconds``, a
    bound generous enough for a loaded machine (not a timing window: it only bounds a hang)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.fixture(scope="session")
def fake_embedder_server() -> Iterator[FakeEmbeddingServer]:
    server = FakeEmbeddingServer().start()
    yield server
    server.stop()


@pytest.fixture
def fake_embedder(fake_embedder_server: FakeEmbeddingServer) -> FakeEmbeddingServer:
    """The fake embedding server, reset to well-behaved with width 64."""
    fake_embedder_server.reset()
    return fake_embedder_server


def make_settings(data_dir: Path, base_url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "dimensions": [16, 64],
        "embedding": {
            "base_url": base_url,
            "model": "fake",
            "template": "{text}",
            "startup_timeout_s": 0,
            "retries": 1,
            # Off unless a test asks: a cache hit would hide what the embedder does.
            "cache_entries": 0,
            "cache_file": False,
        },
        # No background health checks unless a test asks: they would add embedding calls.
        "server": {"port": 0, "grace_period_s": 1, "health_interval_s": 3600},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return Settings(**values)


class ServerThread:
    """The real gRPC server (App) on a free port, on its own event loop in a thread."""

    def __init__(
        self, settings: Settings, store: Store | None = None, tracer_provider: Any = None
    ) -> None:
        self.settings = settings
        self._store = store
        self._tracer_provider = tracer_provider
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.app: App | None = None
        self.port = 0

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def start(self) -> ServerThread:
        self._thread.start()

        async def start() -> int:
            self.app = App(self.settings, self._store, self._tracer_provider)
            return await self.app.start()

        try:
            self.port = self.run(start())
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self) -> None:
        if self.app is not None:
            self.run(self.app.stop(grace=0))
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def client(self) -> Client:
        return Client(self.address, timeout=30)

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address)


@pytest.fixture
def settings(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Settings:
    return make_settings(tmp_path / "data", fake_embedder.base_url)


@pytest.fixture
def server(settings: Settings) -> Iterator[ServerThread]:
    running = ServerThread(settings).start()
    yield running
    running.stop()


@pytest.fixture(params=["embedded", "qdrant-server"])
def either_store(request: pytest.FixtureRequest, settings: Settings) -> Iterator[ServerThread]:
    """The server on the embedded store, then on the Qdrant server store (":memory:")."""
    store = None
    if request.param == "qdrant-server":
        store = QdrantServerStore(AsyncQdrantClient(location=":memory:"), "knn")
    running = ServerThread(settings, store).start()
    yield running
    running.stop()


@pytest.fixture
def client(server: ServerThread) -> Iterator[Client]:
    with server.client() as c:
        yield c
