"""Crash safety: SIGKILL during writes loses nothing acknowledged; start-up repairs the rest."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from bench.harness import wait_until_serving
from knn_classifier.client import Client, KnnClassifierError
from knn_classifier.server.store import EdgeStore, Selection

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_embedding import free_port

DIMENSIONS = (16, 64)


def points_by_dimension(data_dir: Path, classifier: str) -> dict[int, dict[str, str]]:
    """Exemplar id -> label, per dimension, read straight from the stopped server's store."""

    async def read() -> dict[int, dict[str, str]]:
        store = EdgeStore(data_dir)
        await store.open(DIMENSIONS)
        try:
            found = {}
            for d in DIMENSIONS:
                records, _ = await store.vectors(d, classifier)
                found[d] = {str(r.payload["id"]): str(r.payload["label"]) for r in records}
            return found
        finally:
            await store.close()

    return asyncio.run(read())


def test_start_up_repairs_exemplars_missing_from_a_dimension(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        ids = client.add_exemplars("c", [(f"word{i} common", f"l{i % 2}") for i in range(6)])
    running.stop()

    async def break_it() -> None:
        store = EdgeStore(tmp_path)
        await store.open(DIMENSIONS)
        narrow, _ = await store.scroll(16, Selection("c"), 6, None)
        by_id = {str(r.payload["id"]): r.id for r in narrow}
        await store.delete(64, Selection("c", ids=[by_id[ids[0]]]))  # re-embedded
        await store.delete(16, Selection("c", ids=[by_id[ids[1]]]))  # truncated from 64
        await store.close()

    asyncio.run(break_it())
    caplog.set_level(logging.WARNING)
    running = ServerThread(settings).start()
    with running.client() as client:
        for d in DIMENSIONS:
            top = client.classify("c", "word0 common", dimension=d, k=1, include_neighbours=True)
            assert top.neighbours[0].id == ids[0]
            assert top.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)
    running.stop()
    assert "repaired 2 exemplar(s)" in caplog.text
    found = points_by_dimension(tmp_path, "c")
    assert found[16] == found[64]
    assert len(found[16]) == 6


class ServerProcess:
    """``python -m knn_classifier.server`` on a fixed port and data directory."""

    def __init__(self, data_dir: Path, base_url: str) -> None:
        self.port = free_port()
        self.env = {
            **os.environ,
            "KNN_DATA_DIR": str(data_dir),
            "KNN_DIMENSIONS": ",".join(map(str, DIMENSIONS)),
            "KNN_EMBEDDING__BASE_URL": base_url,
            "KNN_EMBEDDING__TEMPLATE": "{text}",
            "KNN_SERVER__PORT": str(self.port),
            "KNN_LOG_LEVEL": "WARNING",
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "knn_classifier.server"],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until_serving(f"127.0.0.1:{self.port}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=30)


def test_sigkill_during_writes_loses_nothing_acknowledged(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    server = ServerProcess(tmp_path, fake_embedder.base_url)
    server.start()
    with Client(f"127.0.0.1:{server.port}") as client:
        client.create_classifier("crash")
    acknowledged: dict[str, str] = {}
    stop = threading.Event()
    rng = random.Random(7)

    def writer() -> None:
        batch = 0
        with Client(f"127.0.0.1:{server.port}", timeout=5) as client:
            while not stop.is_set():
                items = [
                    (f"batch {batch} item {i} words", f"label{(batch + i) % 5}") for i in range(20)
                ]
                try:
                    ids = client.add_exemplars("crash", items)
                except KnnClassifierError:
                    time.sleep(0.05)  # the server is down or restarting: retry the batch
                    continue
                acknowledged.update(zip(ids, (label for _, label in items), strict=True))
                batch += 1

    thread = threading.Thread(target=writer)
    thread.start()
    kills = 0
    deadline = time.monotonic() + 600  # a bound, not a target: restarts are slow under load
    try:
        while kills < 20 and time.monotonic() < deadline:
            time.sleep(rng.uniform(0.05, 0.4))
            server.kill()
            kills += 1
            server.start()
    finally:
        stop.set()
        thread.join(timeout=30)
        server.stop()

    assert kills == 20
    assert len(acknowledged) >= 200, "too few writes were acknowledged to test anything"
    found = points_by_dimension(tmp_path, "crash")
    for d in DIMENSIONS:
        missing = {i for i in acknowledged if i not in found[d]}
        assert not missing, f"{len(missing)} acknowledged exemplars missing from dimension {d}"
        wrong = {i for i, label in acknowledged.items() if found[d][i] != label}
        assert not wrong
    assert set(found[16]) == set(found[64]), "an exemplar is present in one dimension only"
    print(f"\n{kills} kills, {len(acknowledged)} acknowledged exemplars checked in {DIMENSIONS}")
