"""Start-up checks, persistence across restarts, and the real process with graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from bench.harness import wait_until_serving
from knn_classifier.client import Client
from knn_classifier.server.errors import StartupError
from knn_classifier.server.store import EdgeStore

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_embedding import free_port


def test_everything_survives_a_restart_in_every_dimension(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    first = ServerThread(settings).start()
    with first.client() as client:
        client.create_classifier("kept", instruction="Keep it", k=3)
        ids = client.add_exemplars(
            "kept", [(f"text {i} about {i % 4}", f"l{i % 4}") for i in range(40)]
        )
        before = {d: client.classify("kept", "text about 2", dimension=d) for d in (16, 64)}
    first.stop()

    second = ServerThread(settings).start()
    try:
        with second.client() as client:
            info = client.get_classifier("kept")
            assert (info.instruction, info.k, info.exemplar_count) == ("Keep it", 3, 40)
            assert client.list_labels("kept") == {f"l{i}": 10 for i in range(4)}
            listed = client.list_exemplars("kept", page_size=100).exemplars
            assert sorted(e.id for e in listed) == sorted(ids)
            for d in (16, 64):
                after = client.classify("kept", "text about 2", dimension=d, k=40)
                assert sum(s.score for s in after.scores) == pytest.approx(1.0)
                assert {s.label for s in after.scores} == {f"l{i}" for i in range(4)}
                again = client.classify("kept", "text about 2", dimension=d)
                assert again == before[d]
    finally:
        second.stop()


def test_dimensions_wider_than_the_model_refuse_start_up(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 128])
    with pytest.raises(
        StartupError, match=r"dimensions \[128\] exceed the width 64.*KNN_DIMENSIONS=16"
    ):
        ServerThread(settings).start()


def test_data_from_another_embedder_refuses_start_up(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
    running.stop()
    other = make_settings(tmp_path, fake_embedder.base_url, embedding={"model": "other-model"})
    with pytest.raises(
        StartupError, match=r"model='fake'.*model='other-model'.*knn-classifier-migrate"
    ):
        ServerThread(other).start()


def _write(tmp_path: Path, base_url: str, dimensions: list[int], count: int = 12) -> list[str]:
    """Writes ``count`` exemplars of classifier "c" into a store configured with ``dimensions``."""
    running = ServerThread(make_settings(tmp_path, base_url, dimensions=dimensions)).start()
    with running.client() as client:
        client.create_classifier("c")
        ids = client.add_exemplars(
            "c", [(f"text {i} of {i % 3}", f"l{i % 3}") for i in range(count)]
        )
    running.stop()
    return ids


def _recorded_fingerprint(data_dir: Path) -> dict[str, Any]:
    async def read() -> dict[str, Any]:
        store = EdgeStore(data_dir)
        await store.open([])
        try:
            recorded = await store.get_meta("embedder-fingerprint")
            assert recorded is not None
            return recorded
        finally:
            await store.close()

    return asyncio.run(read())


def _assert_complete(client: Client, ids: list[str], dimensions: list[int]) -> None:
    """Every exemplar is its own nearest neighbour, at similarity 1, in every dimension."""
    assert client.get_classifier("c").exemplar_count == len(ids)
    for d in dimensions:
        for i, exemplar_id in enumerate(ids):
            top = client.classify(
                "c", f"text {i} of {i % 3}", dimension=d, k=1, include_neighbours=True
            )
            assert top.neighbours[0].id == exemplar_id
            assert top.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)


def test_a_new_narrower_dimension_is_filled_by_truncation_without_embedding(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    ids = _write(tmp_path, fake_embedder.base_url, [64])
    fake_embedder.reset()
    caplog.set_level(logging.INFO)
    running = ServerThread(make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 64]))
    running.start()
    assert fake_embedder.behaviour.inputs == [["dimension probe"]]  # the start-up probe only
    try:
        with running.client() as client:
            _assert_complete(client, ids, [16, 64])
    finally:
        running.stop()
    assert "dimensions [16] are new" in caplog.text
    assert "completing exemplars missing from some dimensions: 12/12" in caplog.text
    assert "filled the new dimensions [16]: wrote 12 vector(s)" in caplog.text
    recorded = _recorded_fingerprint(tmp_path)
    assert recorded["dimensions"] == [16, 64]
    assert "filling" not in recorded


def test_a_new_wider_dimension_is_filled_by_embedding_the_stored_texts(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    ids = _write(tmp_path, fake_embedder.base_url, [16])
    fake_embedder.reset()
    running = ServerThread(make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 32, 64]))
    running.start()
    embedded = [text for call in fake_embedder.behaviour.inputs[1:] for text in call]
    assert sorted(embedded) == sorted(f"text {i} of {i % 3}" for i in range(12))  # once each
    try:
        with running.client() as client:
            _assert_complete(client, ids, [16, 32, 64])
    finally:
        running.stop()
    assert _recorded_fingerprint(tmp_path)["dimensions"] == [16, 32, 64]


def test_an_interrupted_fill_is_not_recorded_and_resumes_at_the_next_start(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    ids = _write(tmp_path, fake_embedder.base_url, [16])
    fake_embedder.reset(zero_texts={"text 5 of 2"})  # the embedder fails on one stored text
    wider = make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 64])
    with pytest.raises(StartupError, match="could not check or repair"):
        ServerThread(wider).start()
    recorded = _recorded_fingerprint(tmp_path)
    assert (recorded["dimensions"], recorded["filling"]) == ([16], [64])
    fake_embedder.reset()
    running = ServerThread(wider).start()
    try:
        with running.client() as client:
            _assert_complete(client, ids, [16, 64])
    finally:
        running.stop()


def test_a_dimension_configured_again_does_not_bring_back_its_stale_points(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    ids = _write(tmp_path, fake_embedder.base_url, [16, 64])
    narrow = ServerThread(make_settings(tmp_path, fake_embedder.base_url, dimensions=[16])).start()
    with narrow.client() as client:  # changes that the d64 collection, not configured, misses
        client.delete_exemplars("c", ids=ids[6:])
        client.add_exemplars("c", [("text 0 of 0", "relabelled")])
    narrow.stop()
    running = ServerThread(make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 64]))
    running.start()
    try:
        with running.client() as client:
            _assert_complete(client, ids[:6], [16, 64])
            top = client.classify("c", "text 0 of 0", dimension=64, k=1)
            assert top.label == "relabelled"
    finally:
        running.stop()


def test_python_m_serves_and_shuts_down_gracefully_on_sigterm(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    port = free_port()
    env = {
        **os.environ,
        "KNN_DATA_DIR": str(tmp_path),
        "KNN_DIMENSIONS": "16,64",
        "KNN_EMBEDDING__BASE_URL": fake_embedder.base_url,
        "KNN_EMBEDDING__TEMPLATE": "{text}",
        "KNN_SERVER__PORT": str(port),
        "KNN_SERVER__GRACE_PERIOD_S": "2",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "knn_classifier.server"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until_serving(f"127.0.0.1:{port}")  # health SERVING
        with Client(f"127.0.0.1:{port}") as client:
            client.create_classifier("proc")
            client.add_exemplars("proc", [("hello world", "greeting")])
            assert client.classify("proc", "hello").label == "greeting"
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, output
    assert "shutting down" in output
    assert "stopped" in output


def test_python_m_explains_a_bad_setting(tmp_path: Path) -> None:
    env = {**os.environ, "KNN_DIMENSIONS": "256,256"}
    done = subprocess.run(
        [sys.executable, "-m", "knn_classifier.server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode != 0
    assert "dimensions must not repeat" in done.stderr


def test_python_m_explains_an_unreachable_embedder(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KNN_DATA_DIR": str(tmp_path),
        "KNN_EMBEDDING__BASE_URL": f"http://127.0.0.1:{free_port()}/v1",
        "KNN_EMBEDDING__STARTUP_TIMEOUT_S": "0",
        "KNN_EMBEDDING__RETRIES": "0",
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "knn_classifier.server"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert "cannot start" in done.stderr
    assert "KNN_EMBEDDING__BASE_URL" in done.stderr
    assert time.monotonic() - started < 60


def test_a_store_url_selects_the_qdrant_server_store(tmp_path: Path) -> None:
    from knn_classifier.server.app import build_store
    from knn_classifier.server.settings import Settings
    from knn_classifier.server.store import EdgeStore
    from knn_classifier.server.store.qdrant_server import QdrantServerStore

    assert isinstance(build_store(Settings(data_dir=tmp_path)), EdgeStore)
    remote = build_store(Settings(store={"url": "http://qdrant.invalid:6333"}))
    assert isinstance(remote, QdrantServerStore)
