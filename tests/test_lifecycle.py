"""Start-up checks, persistence across restarts, and the real process with graceful shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.harness import wait_until_serving
from knn_classifier.client import Client
from knn_classifier.server.errors import StartupError

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
    with pytest.raises(StartupError, match=r"model='fake'.*model='other-model'"):
        ServerThread(other).start()


def test_new_dimension_over_existing_data_refuses_start_up(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    running = ServerThread(make_settings(tmp_path, fake_embedder.base_url, dimensions=[16])).start()
    with running.client() as client:
        client.create_classifier("c")
    running.stop()
    wider = make_settings(tmp_path, fake_embedder.base_url, dimensions=[16, 32])
    with pytest.raises(StartupError, match=r"dimensions \[32\] are new"):
        ServerThread(wider).start()


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
    remote = build_store(Settings(store={"url": "http://qdrant.invalid:6333"}))  # type: ignore[arg-type]
    assert isinstance(remote, QdrantServerStore)
