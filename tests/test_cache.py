"""The embedding cache: hits make no embedding call, survive restarts, and never break serving."""

from __future__ import annotations

import errno
import hashlib
import sqlite3
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import redis

from knn_classifier.client import UnavailableError
from knn_classifier.server.cache import (
    CachedEmbeddings,
    EmbeddingCache,
    RedisBackend,
    SqliteBackend,
)
from knn_classifier.server.vectors import Fingerprint

from .conftest import ServerThread, make_settings, predictions
from .fake_embedder import FakeEmbeddingServer, fake_vector
from .test_embedding import free_port

FINGERPRINT = Fingerprint("fake", "{text}", 64)


def cached_settings(tmp_path: Path, base_url: str, entries: int = 100, file: bool = True) -> object:
    return make_settings(
        tmp_path, base_url, embedding={"cache_entries": entries, "cache_file": file}
    )


def test_hits_make_no_embedding_call_and_survive_a_restart(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = cached_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()  # type: ignore[arg-type]
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", [("red apple", "fruit"), ("blue car", "car")])
        calls = fake_embedder.behaviour.calls
        assert client.classify("c", "red apple").label == "fruit"  # cached by the add
        assert predictions(client.classify_batch("c", ["blue car", "red apple"]))[0].label == "car"
        assert fake_embedder.behaviour.calls == calls
        client.classify("c", "green apple")
        assert fake_embedder.behaviour.calls == calls + 1
    running.stop()

    running = ServerThread(settings).start()  # type: ignore[arg-type]
    with running.client() as client:
        calls = fake_embedder.behaviour.calls  # the start-up probe is not cached
        assert client.classify("c", "green apple").label == "fruit"
        assert fake_embedder.behaviour.calls == calls
    running.stop()


def test_an_unusable_vector_is_not_cached_and_its_text_heals_with_the_embedder(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = cached_settings(tmp_path, fake_embedder.base_url)
    running = ServerThread(settings).start()  # type: ignore[arg-type]
    try:
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", [("red apple", "fruit"), ("blue car", "car")])
            fake_embedder.reset(zero_texts={"green apple", "green car"})
            for text in ["green apple", "green car"]:
                with pytest.raises(UnavailableError, match="all-zero or non-finite"):
                    client.classify("c", text)
            fake_embedder.reset()  # healed
            assert client.classify("c", "green apple").label == "fruit"
            assert fake_embedder.behaviour.inputs == [["green apple"]]
    finally:
        running.stop()

    running = ServerThread(settings).start()  # type: ignore[arg-type]
    try:
        with running.client() as client:
            fake_embedder.reset()  # forget the start-up probe
            assert client.classify("c", "green car").label == "car"
            assert client.classify("c", "green apple").label == "fruit"  # cached, this time
            assert fake_embedder.behaviour.inputs == [["green car"]]
    finally:
        running.stop()


def test_unusable_vectors_are_left_out(tmp_path: Path) -> None:
    cache = EmbeddingCache(SqliteBackend(tmp_path / "c.sqlite"), 10)
    vectors = np.vstack([fake_vector("a", 64), np.zeros(64), np.full(64, np.nan)])
    cache.put_many(FINGERPRINT, ["a", "zero", "nan"], vectors.astype(np.float32))
    found = cache.get_many(FINGERPRINT, ["a", "zero", "nan"])
    np.testing.assert_array_equal(found[0], fake_vector("a", 64))
    assert found[1:] == [None, None]
    fresh = EmbeddingCache(SqliteBackend(tmp_path / "c.sqlite"), 10)  # the file alone
    found = fresh.get_many(FINGERPRINT, ["a", "zero", "nan"])
    assert [v is None for v in found] == [False, True, True]


def test_the_key_covers_the_embedder(tmp_path: Path) -> None:
    cache = EmbeddingCache(SqliteBackend(tmp_path / "c.sqlite"), 10)
    cache.put_many(FINGERPRINT, ["hello"], np.vstack([fake_vector("hello", 64)]))
    assert cache.get_many(FINGERPRINT, ["hello"])[0] is not None
    other = EmbeddingCache(SqliteBackend(tmp_path / "c.sqlite"), 10)
    assert other.get_many(Fingerprint("another-model", "{text}", 64), ["hello"]) == [None]


class RecordingEmbeds:
    """An inner embedding layer that records the texts it is asked for."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        return np.vstack([fake_vector(t, 64) for t in texts])


async def test_the_cache_layer_sends_only_misses_once_it_knows_the_embedder() -> None:
    """Usable alone over any inner layer: before the fingerprint is known every text goes on
    (nothing is cached under a key it cannot scope); after it, only misses, each once."""
    inner = RecordingEmbeds()
    known: list[Fingerprint | None] = [None]
    cached = CachedEmbeddings(inner, EmbeddingCache(None, 100), lambda: known[0])
    await cached.embed(["a", "b"])
    known[0] = FINGERPRINT
    await cached.embed(["a", "b"])
    await cached.embed(["a", "c", "c", "b"])
    rows = await cached.embed(["c", "a"])
    assert inner.calls == [["a", "b"], ["a", "b"], ["c"]]
    np.testing.assert_array_equal(rows, np.vstack([fake_vector("c", 64), fake_vector("a", 64)]))


def test_the_memory_layer_is_bounded(tmp_path: Path) -> None:
    cache = EmbeddingCache(None, 2)
    cache.put_many(FINGERPRINT, ["a", "b", "c"], np.vstack([fake_vector(t, 64) for t in "abc"]))
    found = cache.get_many(FINGERPRINT, ["a", "b", "c"])
    assert found[0] is None
    np.testing.assert_array_equal(found[2], fake_vector("c", 64))


def test_a_corrupt_file_degrades_to_no_cache_with_a_warning(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "embedding-cache.sqlite").write_bytes(b"this is not a database" * 100)
    settings = cached_settings(tmp_path, fake_embedder.base_url, entries=0)
    running = ServerThread(settings).start()  # type: ignore[arg-type]
    try:
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", [("red apple", "fruit"), ("blue car", "car")])
            assert client.classify("c", "red apple").label == "fruit"
    finally:
        running.stop()
    assert "embedding cache unusable" in caplog.text


@pytest.mark.parametrize(
    "stored",
    [
        b"\x00" * 12,  # the wrong size
        b"\x00" * 256,  # all zero (written by a version that cached it)
        np.full(64, np.nan, dtype="<f4").tobytes(),
    ],
    ids=["wrong size", "zero", "nan"],
)
@pytest.mark.parametrize("memory_entries", [0, 10])
def test_rows_that_are_not_usable_vectors_are_ignored(
    tmp_path: Path, stored: bytes, memory_entries: int
) -> None:
    path = tmp_path / "c.sqlite"
    EmbeddingCache(SqliteBackend(path), 0).put_many(
        FINGERPRINT, ["hello"], np.vstack([fake_vector("hello", 64)])
    )
    with sqlite3.connect(path) as db:
        db.execute("UPDATE vectors SET vector = ?", (stored,))
    cache = EmbeddingCache(SqliteBackend(path), memory_entries)
    assert cache.get_many(FINGERPRINT, ["hello"]) == [None]
    # Nor from the memory layer on the next read: memory hits are served unchecked.
    assert cache.get_many(FINGERPRINT, ["hello"]) == [None]


def test_vectors_of_another_width_than_the_fingerprint_are_not_cached(tmp_path: Path) -> None:
    cache = EmbeddingCache(SqliteBackend(tmp_path / "c.sqlite"), 10)
    cache.put_many(FINGERPRINT, ["hello"], np.vstack([fake_vector("hello", 32)]))
    assert cache.get_many(FINGERPRINT, ["hello"]) == [None]


def test_keys_are_those_of_earlier_versions(tmp_path: Path) -> None:
    """A cache file written before keeps answering: the key is SHA-256 of the fingerprint's
    sorted items, a NUL and the prompt."""
    path = tmp_path / "c.sqlite"
    EmbeddingCache(SqliteBackend(path), 0).put_many(
        FINGERPRINT, ["hello"], np.vstack([fake_vector("hello", 64)])
    )
    scope = repr(sorted(FINGERPRINT.as_payload().items())).encode()
    with sqlite3.connect(path) as db:
        (key,) = db.execute("SELECT key FROM vectors").fetchone()
    assert key == hashlib.sha256(scope + b"\x00" + b"hello").digest()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A real redis-server (Debian package, installed by .ci/run) on a free port."""
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 60
    while True:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    yield url
    server.terminate()
    server.wait(timeout=10)


def test_replicas_share_vectors_through_redis(redis_url: str) -> None:
    first = EmbeddingCache(RedisBackend(redis_url), 10)
    second = EmbeddingCache(RedisBackend(redis_url), 10)
    first.put_many(FINGERPRINT, ["shared text"], np.vstack([fake_vector("shared text", 64)]))
    found = second.get_many(FINGERPRINT, ["shared text", "never seen"])
    np.testing.assert_array_equal(found[0], fake_vector("shared text", 64))
    assert found[1] is None


def test_the_service_uses_redis_and_survives_its_loss(
    tmp_path: Path,
    fake_embedder: FakeEmbeddingServer,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        tmp_path,
        fake_embedder.base_url,
        embedding={"cache_entries": 0, "cache_file": False, "cache_redis_url": redis_url},
    )
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", [("red apple", "fruit"), ("blue car", "car")])
            calls = fake_embedder.behaviour.calls
            assert client.classify("c", "red apple").label == "fruit"
            assert fake_embedder.behaviour.calls == calls  # a Redis hit
            assert redis.Redis.from_url(redis_url).dbsize() == 2
            redis.Redis.from_url(redis_url).shutdown(nosave=True)
            assert client.classify("c", "blue car").label == "car"
            assert client.classify("c", "green apple").label == "fruit"
    finally:
        running.stop()
    assert "embedding cache unusable" in caplog.text


def warnings_about_the_cache(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "embedding cache unusable" in r.getMessage()]


def test_a_refused_redis_write_fails_no_request(
    tmp_path: Path,
    fake_embedder: FakeEmbeddingServer,
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = make_settings(
        tmp_path,
        fake_embedder.base_url,
        embedding={"cache_entries": 0, "cache_file": False, "cache_redis_url": redis_url},
    )
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", [("red apple", "fruit"), ("blue car", "car")])
            # Out of memory: Redis still answers reads but refuses every write.
            redis.Redis.from_url(redis_url).config_set("maxmemory", 1)
            assert client.classify("c", "green apple").label == "fruit"
            labels = [
                p.label for p in predictions(client.classify_batch("c", ["red pear", "green car"]))
            ]
            assert labels == ["fruit", "car"]
    finally:
        running.stop()
    [warning] = warnings_about_the_cache(caplog)
    assert "maxmemory" in warning


@pytest.fixture
def full_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A directory on a tiny tmpfs the test mounts; ``fill`` it to make writes there fail."""
    mount_point = tmp_path / "tiny"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill(directory: Path) -> None:
    """Writes a file in ``directory`` until its file system has no space left."""
    with (directory / "filler").open("wb", buffering=0) as filler:
        try:
            while True:
                filler.write(b"\xff" * 4096)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise


def test_a_full_disk_under_the_cache_file_fails_no_request(
    tmp_path: Path,
    fake_embedder: FakeEmbeddingServer,
    full_filesystem: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # Only the cache file is on the tiny file system; the store has room.
    (data_dir / "embedding-cache.sqlite").symlink_to(full_filesystem / "cache.sqlite")
    settings = cached_settings(data_dir, fake_embedder.base_url, entries=0)
    running = ServerThread(settings).start()  # type: ignore[arg-type]
    try:
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", [("red apple", "fruit"), ("blue car", "car")])
            assert (full_filesystem / "cache.sqlite-wal").exists()  # the cache is in use
            fill(full_filesystem)
            texts = [f"green apple {i}" for i in range(50)]
            assert {p.label for p in predictions(client.classify_batch("c", texts))} == {"fruit"}
            assert client.classify("c", "green car").label == "car"
            assert client.classify("c", "red apple").label == "fruit"
    finally:
        running.stop()
    [warning] = warnings_about_the_cache(caplog)
    assert "database or disk is full" in warning


def test_the_file_keeps_the_most_recently_written_vectors_only(tmp_path: Path) -> None:
    backend = SqliteBackend(tmp_path / "c.sqlite", max_entries=10)
    rows = [(f"key{i}".encode(), bytes([i])) for i in range(25)]
    for start in range(0, 20, 4):
        backend.put_many(rows[start : start + 4])
    backend.put_many([rows[3]])  # written again: now among the newest
    backend.put_many(rows[20:25])
    kept = backend.get_many([key for key, _ in rows])
    backend.close()
    assert sorted(kept) == sorted([rows[3][0]] + [key for key, _ in rows[16:25]])
