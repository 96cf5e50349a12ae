"""Embedding cache: an in-process LRU in front of a persistent layer shared across restarts.

The persistent layer is a SQLite file in the data directory, or Redis when replicas should share
it. Keys are SHA-256 digests of the embedder fingerprint and the exact prompt (the classifier's
instruction and the text, as the model sees them), so a vector is only ever reused for the very
same model input. Anything wrong with the persistent layer (corrupt file, full disk, Redis
unreachable, a write refused) turns it off with one warning: the service then embeds, never
fails and never serves a vector it cannot trust. Only usable vectors go in (finite, with a
non-zero norm; see :func:`usable_rows`), and values of the wrong size or not usable are misses,
so a bad vector written by an older version is never served either.

:class:`CachedEmbeddings` is the layer that puts the cache in front of another embedding layer.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import redis

from .metrics import Metrics
from .vectors import Embeds, Fingerprint, Matrix, usable_rows

log = logging.getLogger(__name__)


class Backend(Protocol):
    """A persistent key -> vector bytes store; its errors are the classes in ``failures``."""

    failures: tuple[type[Exception], ...]
    name: str
    """The layer's name in the cache metrics."""

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]: ...

    def put_many(self, rows: Sequence[tuple[bytes, bytes]]) -> None: ...

    def close(self) -> None: ...


class SqliteBackend:
    """Vectors in a SQLite file, at most ``max_entries``: the least recently written go first."""

    failures: tuple[type[Exception], ...] = (sqlite3.Error,)
    name = "sqlite"

    def __init__(self, path: Path, max_entries: int = 1_000_000) -> None:
        self._max_entries = max_entries
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path)
        # A cache may lose its last writes in a power cut, so it need not wait for the disk on
        # every commit: write-ahead log with synchronous=NORMAL (never corrupt, just behind).
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB)")

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            query = f"SELECT key, vector FROM vectors WHERE key IN ({marks})"
            found.update(self._db.execute(query, chunk).fetchall())
        return found

    def put_many(self, rows: Sequence[tuple[bytes, bytes]]) -> None:
        # A replaced row gets a new, highest rowid, so rowids order rows by their last write
        # and everything more than max_entries below the newest is the oldest to drop.
        self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)
        self._db.execute(
            "DELETE FROM vectors WHERE rowid <= (SELECT max(rowid) FROM vectors) - ?",
            (self._max_entries,),
        )
        self._db.commit()

    def close(self) -> None:
        self._db.close()


class RedisBackend:
    """Vectors in Redis under ``knn:embedding:<key>``; short timeouts, so an outage costs little."""

    failures: tuple[type[Exception], ...] = (redis.RedisError, OSError)
    name = "redis"

    def __init__(self, url: str) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)

    @staticmethod
    def _name(key: bytes) -> bytes:
        return b"knn:embedding:" + key

    def get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        values = self._redis.mget([self._name(k) for k in keys])
        return {k: v for k, v in zip(keys, values, strict=True) if isinstance(v, bytes)}

    def put_many(self, rows: Sequence[tuple[bytes, bytes]]) -> None:
        self._redis.mset({self._name(k): v for k, v in rows})

    def close(self) -> None:
        self._redis.close()


def persistent_backend(
    redis_url: str | None, sqlite_path: Path | None, sqlite_entries: int
) -> Backend | None:
    """Redis if a URL is given, else SQLite at ``sqlite_path`` (at most ``sqlite_entries``
    vectors), else none; None (with a warning) if it cannot be opened."""
    try:
        if redis_url:
            return RedisBackend(redis_url)
        if sqlite_path is not None:
            return SqliteBackend(sqlite_path, sqlite_entries)
    except (*SqliteBackend.failures, *RedisBackend.failures) as exc:
        log.warning("embedding cache unusable (%s); continuing without it", exc)
    return None


class EmbeddingCache:
    """Vectors by (embedder fingerprint, prompt): an LRU in memory over an optional backend."""

    def __init__(
        self, backend: Backend | None, memory_entries: int, metrics: Metrics | None = None
    ) -> None:
        self._metrics = metrics or Metrics()
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._memory_entries = memory_entries
        self._backend = backend

    def get_many(self, fingerprint: Fingerprint, prompts: Sequence[str]) -> list[Matrix | None]:
        """The vector of each prompt embedded by ``fingerprint``'s embedder, or None.

        The memory layer holds only usable vectors of the right size (checked when they went
        in), so its hits are served as they are; the backend's are checked when read."""
        scope = _scope(fingerprint)
        keys = [_key(scope, p) for p in prompts]
        found = {k: self._memory[k] for k in keys if k in self._memory}
        for key in found:
            self._memory.move_to_end(key)
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if self._memory_entries:
            self._count("memory", len(found), len(missing))
        if missing and self._backend is not None:
            try:
                stored = self._backend.get_many(missing)
            except self._backend.failures as exc:
                self._disable(exc)
            else:
                self._count(self._backend.name, len(stored), len(missing) - len(stored))
                for key, blob in stored.items():
                    if _vector(blob, fingerprint.width) is not None:
                        found[key] = blob
                        self._remember(key, blob)
        return [_served(found.get(k)) for k in keys]

    def put_many(self, fingerprint: Fingerprint, prompts: Sequence[str], vectors: Matrix) -> None:
        """Remembers the vectors of ``prompts``; rows that are not usable are left out."""
        scope = _scope(fingerprint)
        usable = usable_rows(vectors) & (vectors.shape[1] == fingerprint.width)
        rows = [
            (_key(scope, p), v.astype("<f4").tobytes())
            for p, v, ok in zip(prompts, vectors, usable, strict=True)
            if ok
        ]
        for key, blob in rows:
            self._remember(key, blob)
        if self._backend is not None:
            try:
                self._backend.put_many(rows)
            except self._backend.failures as exc:
                self._disable(exc)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    def _count(self, layer: str, hits: int, misses: int) -> None:
        metrics = self._metrics
        metrics.series(metrics.cache_lookups, layer, "hit").inc(hits)
        metrics.series(metrics.cache_lookups, layer, "miss").inc(misses)

    def _remember(self, key: bytes, blob: bytes) -> None:
        self._memory[key] = blob
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    def _disable(self, exc: Exception) -> None:
        log.warning("embedding cache unusable (%s); continuing without it", exc)
        backend, self._backend = self._backend, None
        if backend is not None:
            with contextlib.suppress(*backend.failures):
                backend.close()


@functools.lru_cache(maxsize=8)
def _scope(fingerprint: Fingerprint) -> bytes:
    """The prefix of the keys of ``fingerprint``'s vectors (made once, not per prompt)."""
    return repr(sorted(fingerprint.as_payload().items())).encode() + b"\x00"


def _key(scope: bytes, prompt: str) -> bytes:
    """The key of a prompt: scoped to the embedder, so another model's vector is never reused."""
    return hashlib.sha256(scope + prompt.encode()).digest()


def _vector(blob: bytes | None, width: int) -> Matrix | None:
    """The vector in ``blob`` if it has ``width`` components and is usable, else None."""
    if blob is None or len(blob) != 4 * width:
        return None
    vector = np.frombuffer(blob, dtype="<f4")
    return vector if usable_rows(vector[np.newaxis])[0] else None


def _served(blob: bytes | None) -> Matrix | None:
    """A blob found in memory (checked when it went in) as a vector."""
    return None if blob is None else np.frombuffer(blob, dtype="<f4")


class CachedEmbeddings:
    """An embedding layer that answers known prompts from ``cache`` and sends the others to
    ``inner`` (a batch of hits makes no call), remembering what it answers.

    ``fingerprint`` tells which embedder ``inner`` ends at, or None while unknown (before its
    first answer told the width): then every text goes to ``inner``.
    """

    def __init__(
        self,
        inner: Embeds,
        cache: EmbeddingCache,
        fingerprint: Callable[[], Fingerprint | None],
    ) -> None:
        self._inner = inner
        self._cache = cache
        self._fingerprint = fingerprint

    async def embed(self, texts: Sequence[str]) -> Matrix:
        fingerprint = self._fingerprint()
        if fingerprint is None:
            return await self._inner.embed(texts)
        cached = self._cache.get_many(fingerprint, texts)
        missing = list(dict.fromkeys(t for t, v in zip(texts, cached, strict=True) if v is None))
        if not missing:
            return np.vstack(cached)  # type: ignore[arg-type]
        fresh = await self._inner.embed(missing)
        self._cache.put_many(fingerprint, missing, fresh)
        by_text = dict(zip(missing, fresh, strict=True))
        return np.vstack(
            [by_text[t] if v is None else v for t, v in zip(texts, cached, strict=True)]
        )
