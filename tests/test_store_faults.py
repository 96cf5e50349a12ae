"""Embedded store faults: a damaged shard, a full disk, lost classifier records, a data directory
that is locked, read-only or damaged at start-up.

Each ends in a defined status or one clear start-up line, never a hang, a dead process or a
traceback. The tests that mount file systems need root and skip without it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.harness import serving
from knn_classifier.client import (
    Client,
    KnnClassifierError,
    ResourceExhaustedError,
    UnavailableError,
)
from knn_classifier.server.coalescing import QueryBatcher
from knn_classifier.server.errors import ResourceExhausted, StartupError
from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.schema import read_payload

from .conftest import ServerThread, make_settings, wait_for
from .fake_embedder import FakeEmbeddingServer
from .test_embedding import free_port
from .test_faults import NOT_SERVING, health

EXEMPLARS = [(f"word{i} common", f"label{i % 3}") for i in range(9)]


def seeded(settings: Any, classifiers: dict[str, int] | None = None) -> None:
    """Runs a server once to create ``classifiers`` (name -> exemplars), then stops it."""
    running = ServerThread(settings).start()
    with running.client() as client:
        for name, count in (classifiers or {"c": len(EXEMPLARS)}).items():
            client.create_classifier(name)
            client.add_exemplars(name, EXEMPLARS[:count])
    running.stop()


def break_payload_pointers(shard: Path) -> None:
    """Points every payload pointer of ``shard`` past the end of its storage page and empties
    the journal that would restore them on load. The shard opens and counts, but reading a
    payload panics inside Edge (``assertion failed: byte_offset < page_size_bytes``)."""
    storages = list(shard.glob("segments/*/payload_storage"))
    assert storages, f"no payload storage under {shard}"
    for storage in storages:
        journal = storage / "tracker_journal.dat"
        journal.write_bytes(bytes(journal.stat().st_size))
        tracker = bytearray((storage / "tracker.dat").read_bytes())
        for entry in range(0, len(tracker), 16):  # u32 length, is-set, page, block offset
            tracker[entry + 12 : entry + 16] = (0xFFFFF).to_bytes(4, "little")
        (storage / "tracker.dat").write_bytes(tracker)


def break_vector_status(shard: Path) -> None:
    """Truncates the status file of the shard's vector storage: Edge panics while loading."""
    for status in shard.glob("segments/*/vector_storage/vectors/status.dat"):
        status.write_bytes(b"")


# Defect 8: a Rust panic in the embedded store ----------------------------------------------------


def test_a_panic_in_the_store_answers_every_caller_and_turns_health_not_serving(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, server={"health_interval_s": 0.1})
    seeded(settings)
    shard = tmp_path / "edge" / "d64"
    break_payload_pointers(shard)
    caplog.set_level(logging.ERROR)
    running = ServerThread(settings).start()
    try:

        def classify(text: str) -> KnnClassifierError | str:
            with running.client() as client:
                try:
                    return client.classify("c", text, dimension=64, timeout=30).label
                except KnnClassifierError as exc:
                    return exc

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(classify, [f"word{i} common" for i in range(8)]))
        assert all(isinstance(answer, UnavailableError) for answer in answers), answers
        assert all(str(shard) in str(answer) for answer in answers)
        # The store is out of service until a restart, in every dimension, and says so.
        with running.client() as client, pytest.raises(UnavailableError, match="restart"):
            client.classify("c", "word1 common", dimension=16)
        wait_for(lambda: health(running) == NOT_SERVING)
    finally:
        running.stop()
    assert f"the embedded store shard {shard} failed" in caplog.text


def test_batched_queries_answer_every_caller_whatever_the_store_raises(tmp_path: Path) -> None:
    """A BaseException that is not an Exception (as a Rust panic is) must not strand callers.

    Runs its own event loop: where the batcher lets such an exception escape, it ends the loop,
    and this test fails instead of the test session.
    """

    class Panic(BaseException):
        pass

    async def panicking(*args: object) -> Any:
        raise Panic("assertion failed")

    async def ask() -> list[Any]:
        store = EdgeStore(tmp_path)
        await store.open([2])
        try:
            store.query = panicking  # type: ignore[method-assign,assignment]
            batcher = QueryBatcher(store)
            vector = np.array([[1, 0]], np.float32)
            return list(
                await asyncio.wait_for(
                    asyncio.gather(
                        batcher.query(2, "c", vector, 1),
                        batcher.query(2, "c", vector, 3),
                        return_exceptions=True,
                    ),
                    timeout=30,
                )
            )
        finally:
            await store.close()

    answers = asyncio.run(ask())
    assert [type(a) for a in answers] == [RuntimeError, RuntimeError]  # INTERNAL in the API
    assert "assertion failed" in str(answers[0])


# Defect 10: classifier records lost --------------------------------------------------------------


def test_exemplars_without_classifier_records_stop_start_up(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    seeded(settings, {"alpha": 4, "beta": 2})
    shutil.rmtree(tmp_path / "edge" / "meta")
    with pytest.raises(StartupError) as refused:
        ServerThread(settings).start()
    message = str(refused.value)
    assert "6 exemplars of 2 classifier(s) that have no classifier record" in message
    assert "'alpha' (4 exemplars), 'beta' (2 exemplars)" in message
    assert "restore them from a backup" in message
    assert "KNN_STORE__DELETE_ORPHANED_EXEMPLARS=true" in message

    told = make_settings(
        tmp_path, fake_embedder.base_url, store={"delete_orphaned_exemplars": True}
    )
    running = ServerThread(told).start()
    with running.client() as client:
        assert client.list_classifiers() == []
        client.create_classifier("alpha")  # a new classifier of an old name starts empty
        assert client.get_classifier("alpha").exemplar_count == 0
    running.stop()
    running = ServerThread(settings).start()  # and nothing is left to refuse
    running.stop()


def test_a_classifier_without_exemplars_left_does_not_count_as_orphaned(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url)
    seeded(settings, {"gone": 3, "kept": 3})
    running = ServerThread(settings).start()
    with running.client() as client:
        client.delete_classifier("gone")
    running.stop()
    running = ServerThread(settings).start()
    with running.client() as client:
        assert [c.name for c in client.list_classifiers()] == ["kept"]
    running.stop()


# Defect 14 (store part): one clear line at start-up ----------------------------------------------


class ServerProcess:
    """``python -m knn_classifier.server`` as a subprocess, its stderr kept in a file."""

    def __init__(self, data_dir: Path, base_url: str, log: Path, **env: str) -> None:
        self.port = free_port()
        self.log = log
        self.env = {
            **os.environ,
            "KNN_DATA_DIR": str(data_dir),
            "KNN_DIMENSIONS": "16,64",
            "KNN_EMBEDDING__BASE_URL": base_url,
            "KNN_EMBEDDING__TEMPLATE": "{text}",
            "KNN_EMBEDDING__CACHE_FILE": "false",
            "KNN_SERVER__PORT": str(self.port),
            "KNN_LOG_LEVEL": "WARNING",
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> bool:
        """Starts the server: True once it serves, False if it exited first (see ``stderr``)."""
        with self.log.open("wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "knn_classifier.server"],
                env=self.env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        # The port opens before the store does (health NOT_SERVING while starting): wait for
        # SERVING or for the process to exit.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if serving(f"127.0.0.1:{self.port}"):
                return True
            if self.process.poll() is not None:
                return False
            time.sleep(0.1)
        raise AssertionError("the server neither served nor exited within 120 s")

    @property
    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def client(self) -> Client:
        return Client(f"127.0.0.1:{self.port}", timeout=30)

    def stop(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=60) == 0, self.stderr


def refused_start(server: ServerProcess) -> str:
    """Starts ``server`` expecting it to refuse; returns its one line, checked for form."""
    assert not server.start(), "the server started"
    return refusal(server)


def refusal(server: ServerProcess) -> str:
    """The last line of a server that exited at start-up, checked for form: no traceback."""
    assert server.process is not None
    assert server.process.wait(timeout=30) != 0
    assert "Traceback" not in server.stderr, server.stderr
    line = server.stderr.strip().splitlines()[-1]
    assert line.startswith("knn-classifier cannot start: "), server.stderr
    return line


@contextmanager
def mounted(*args: str, target: Path) -> Iterator[Path]:
    """``mount args target`` for the duration; skips the test where mounting is impossible."""
    if os.geteuid() != 0:
        pytest.skip("mounting a test file system needs root")
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a test file system here: {done.stderr.strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", "-l", str(target)], check=True)


def make_store(data_dir: Path) -> None:
    """An embedded store with a few points in dimensions 16 and 64."""

    async def make() -> None:
        store = EdgeStore(data_dir)
        await store.open([16, 64])
        for dimension in (16, 64):
            ids = [str(uuid.uuid4()) for _ in range(3)]
            payloads = [
                read_payload({"classifier": "c", "label": "l", "text": i, "id": i}) for i in ids
            ]
            vectors = np.eye(3, dimension, dtype=np.float32)
            await store.upsert(dimension, ids, vectors, payloads)
        await store.close()

    asyncio.run(make())


def test_a_data_directory_locked_by_another_instance_gives_one_line(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    data = tmp_path / "data"

    async def hold_and_start() -> str:
        holder = EdgeStore(data)
        await holder.open([16, 64])
        try:
            server = ServerProcess(data, fake_embedder.base_url, tmp_path / "stderr")
            return await asyncio.to_thread(refused_start, server)
        finally:
            await holder.close()

    line = asyncio.run(hold_and_start())
    assert f"{data / 'edge' / 'meta'} is locked by another process" in line
    assert "give each instance its own KNN_DATA_DIR" in line


@pytest.mark.parametrize(
    ("damage", "shard"),
    [
        (lambda d: (d / "wal" / "open-1").write_bytes(b"garbage" * 1000), "d64"),
        (lambda d: (d / "wal" / "first-index").write_text("garbage"), "d16"),
        (break_vector_status, "d64"),  # a Rust panic while loading
    ],
    ids=["garbage-wal", "garbage-wal-index", "truncated-segment-file"],
)
def test_a_damaged_shard_gives_one_line_naming_it(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, damage: Any, shard: str
) -> None:
    data = tmp_path / "data"
    make_store(data)
    damage(data / "edge" / shard)
    line = refused_start(ServerProcess(data, fake_embedder.base_url, tmp_path / "stderr"))
    assert f"the embedded store at {data / 'edge' / shard} cannot be opened" in line
    assert "restore the data directory from a backup" in line


def test_a_read_only_data_directory_gives_one_line(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    source = tmp_path / "source"
    make_store(source)
    with mounted("--bind", str(source), target=tmp_path / "ro") as data:
        done = subprocess.run(["mount", "-o", "remount,bind,ro", str(data)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot remount read-only: {done.stderr.decode().strip()}")
        line = refused_start(ServerProcess(data, fake_embedder.base_url, tmp_path / "stderr"))
    assert f"the data directory {data / 'edge'} is not writable" in line


def test_a_damaged_dimension_shard_moved_aside_is_rebuilt_at_start_up(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    """What the start-up message advises for a damaged dimension shard works."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    seeded(settings)
    shard = tmp_path / "edge" / "d64"
    break_vector_status(shard)
    with pytest.raises(StartupError, match=f"{shard} cannot be opened"):
        ServerThread(settings).start()
    shard.rename(tmp_path / "d64.damaged")
    caplog.set_level(logging.WARNING)
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            for text, label in EXEMPLARS:
                answer = client.classify("c", text, dimension=64, k=1, include_neighbours=True)
                assert answer.neighbours[0].label == label
                assert answer.neighbours[0].similarity == pytest.approx(1.0, abs=1e-5)
    finally:
        running.stop()
    assert f"repaired {len(EXEMPLARS)} exemplar(s)" in caplog.text


# Defect 9: a full disk -------------------------------------------------------------------------


async def test_within_the_reserve_additions_are_refused_and_deletions_go_on(
    tmp_path: Path,
) -> None:
    """The reserve, on whatever disk tmp_path is: set to 1.5 times the free space, the store
    opens (half is free), refuses additions and still deletes and writes records, so a refused
    write can be rolled back and a delete finished; set to 3 times, it does not open."""
    point = [str(uuid.uuid4())]
    payload = [read_payload({"classifier": "c", "label": "l", "text": "t", "id": "t"})]
    vector = np.array([[1, 0]], np.float32)
    store = EdgeStore(tmp_path)
    await store.open([2])
    await store.upsert(2, point, vector, payload)
    await store.close()
    stats = os.statvfs(tmp_path)
    free = stats.f_bavail * stats.f_frsize

    store = EdgeStore(tmp_path, min_free_bytes=free * 3 // 2)
    await store.open([2])
    try:
        with pytest.raises(ResourceExhausted, match="disk is nearly full") as refused:
            await store.upsert(2, [str(uuid.uuid4())], vector, payload)
        assert refused.value.reason == "STORAGE_FULL"
        # Small records go on, like deletions: a delete marks and bumps its classifier's record.
        await store.put_meta("classifier:c", {"kind": "classifier", "name": "c"})
        await store.delete(2, Selection("c"))
        assert await store.count(2, Selection("c")) == 0
    finally:
        await store.close()
    with pytest.raises(StartupError, match="free disk space there"):
        await EdgeStore(tmp_path, min_free_bytes=free * 3).open([2])


@contextmanager
def small_disk(image: Path, target: Path, size_mib: int) -> Iterator[Path]:
    """An ext4 file system of ``size_mib`` MiB in ``image``, loop-mounted on ``target``.

    Not tmpfs: there, opening the store fills in its memory-mapped files (measured: 41 to 64 MiB
    on a 64 MiB tmpfs, SIGBUS), which no reserve on a small test disk covers; on ext4, as on
    the disks the service runs on, opening allocates nothing (docs/reliability.md).
    """
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    with image.open("wb") as file:
        file.truncate(size_mib * 2**20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    with mounted("-o", "loop", str(image), target=target) as disk:
        yield disk


def grow(image: Path, disk: Path, size_mib: int) -> None:
    """Grows the file system of ``small_disk`` to ``size_mib`` MiB (offline: containers may
    refuse the online resize) and mounts it again."""
    subprocess.run(["umount", str(disk)], check=True)
    with image.open("r+b") as file:
        file.truncate(size_mib * 2**20)
    subprocess.run(["e2fsck", "-f", "-p", str(image)], capture_output=True, check=True)
    subprocess.run(["resize2fs", str(image)], capture_output=True, check=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(disk)], check=True)


def test_a_full_disk_refuses_writes_keeps_reads_and_loses_nothing(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """The server (a subprocess: a SIGBUS would kill pytest) on a 40 MiB disk with a 12 MiB
    reserve is filled with AddExemplars until RESOURCE_EXHAUSTED; every acknowledged exemplar
    is listed and Classify works, also after a restart on the full disk and after the disk
    grows. With a reserve the disk cannot hold, the server refuses to start with one line."""
    image = tmp_path / "disk.img"
    with small_disk(image, tmp_path / "disk", 40) as disk:
        reserve = 12 * 2**20
        server = ServerProcess(
            disk,
            fake_embedder.base_url,
            tmp_path / "stderr",
            KNN_STORE__MIN_FREE_BYTES=str(reserve),
        )
        assert server.start(), server.stderr
        acknowledged: set[str] = set()
        refused = ""
        with server.client() as client:
            client.create_classifier("full")
            for batch in range(1000):
                items = [
                    (f"{batch} {i} {os.urandom(960).hex()}", f"label{i % 4}") for i in range(100)
                ]
                try:
                    acknowledged.update(client.add_exemplars("full", items))
                except ResourceExhaustedError as exc:
                    refused = str(exc)
                    break
            assert "disk is nearly full" in refused, "the disk never filled up"
            assert len(acknowledged) >= 1000, "too few writes were acknowledged to test anything"
            assert_all_listed(client, acknowledged)
            assert client.classify("full", "label text").label.startswith("label")
        server.stop()
        assert "writes are refused until there is room; reads go on" in server.stderr

        # A restart on the full disk serves reads and refuses writes.
        assert server.start(), server.stderr
        with server.client() as client:
            assert_all_listed(client, acknowledged)
            assert client.classify("full", "label text").label.startswith("label")
            with pytest.raises(ResourceExhaustedError):
                client.add_exemplars("full", [("one more text", "label0")])
        server.stop()

        # Opening needs half the reserve free: with a reserve the disk cannot hold, one line.
        server.env["KNN_STORE__MIN_FREE_BYTES"] = str(4 * reserve)
        assert "free disk space there" in refused_start(server)
        server.env["KNN_STORE__MIN_FREE_BYTES"] = str(reserve)

        grow(image, disk, 80)
        assert server.start(), server.stderr
        with server.client() as client:
            assert_all_listed(client, acknowledged)
            client.add_exemplars("full", [("one more text", "label0")])
        server.stop()


def assert_all_listed(client: Client, acknowledged: set[str]) -> None:
    listed: set[str] = set()
    token = ""
    while True:
        page = client.list_exemplars("full", page_size=1000, page_token=token)
        listed.update(exemplar.id for exemplar in page.exemplars)
        token = page.next_page_token
        if not token:
            break
    missing = acknowledged - listed
    assert not missing, f"{len(missing)} acknowledged exemplars are missing"
