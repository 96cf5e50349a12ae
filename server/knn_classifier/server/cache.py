"""Embedding cache: an in-process LRU in front of a SQLite file in the data directory.

Keys are SHA-256 digests of the embedder fingerprint and the exact prompt (the classifier's
instruction and the text, as the model sees them), so a vector is only ever reused for the very
same model input. Anything wrong with the SQLite file (corrupt, unreadable, full disk) turns the
persistent layer off with a warning: the service then embeds, never fails and never serves a
vector it cannot trust (rows of the wrong size are ignored).
"""

from __future__ import annotations

import hashlib
import logging
import sqlite3
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .embedding import Fingerprint, Matrix

log = logging.getLogger(__name__)


class EmbeddingCache:
    def __init__(self, path: Path | None, memory_entries: int) -> None:
        self._memory: OrderedDict[bytes, bytes] = OrderedDict()
        self._memory_entries = memory_entries
        self._db: sqlite3.Connection | None = None
        self._prefix = b""
        self._width = 0
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path)
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS vectors (key BLOB PRIMARY KEY, vector BLOB)"
                )
            except sqlite3.Error as exc:
                self._disable(exc)

    def bind(self, fingerprint: Fingerprint) -> None:
        """Scopes every key to the embedder the service runs with."""
        self._prefix = repr(sorted(fingerprint.as_payload().items())).encode()
        self._width = fingerprint.width

    def get_many(self, prompts: Sequence[str]) -> list[Matrix | None]:
        keys = [self._key(p) for p in prompts]
        found = {k: self._memory[k] for k in keys if k in self._memory}
        for key in found:
            self._memory.move_to_end(key)
        missing = [k for k in dict.fromkeys(keys) if k not in found]
        if missing and self._db is not None:
            try:
                for start in range(0, len(missing), 500):
                    chunk = missing[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    query = f"SELECT key, vector FROM vectors WHERE key IN ({marks})"
                    for key, blob in self._db.execute(query, chunk):
                        found[key] = blob
                        self._remember(key, blob)
            except sqlite3.Error as exc:
                self._disable(exc)
        return [self._vector(found.get(k)) for k in keys]

    def put_many(self, prompts: Sequence[str], vectors: Matrix) -> None:
        rows = [
            (self._key(p), v.astype("<f4").tobytes()) for p, v in zip(prompts, vectors, strict=True)
        ]
        for key, blob in rows:
            self._remember(key, blob)
        if self._db is not None:
            try:
                self._db.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?)", rows)
                self._db.commit()
            except sqlite3.Error as exc:
                self._disable(exc)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _key(self, prompt: str) -> bytes:
        return hashlib.sha256(self._prefix + b"\x00" + prompt.encode()).digest()

    def _vector(self, blob: bytes | None) -> Matrix | None:
        if blob is None or len(blob) != 4 * self._width:
            return None
        vector = np.frombuffer(blob, dtype="<f4")
        return vector if bool(np.all(np.isfinite(vector))) else None

    def _remember(self, key: bytes, blob: bytes) -> None:
        self._memory[key] = blob
        self._memory.move_to_end(key)
        while len(self._memory) > self._memory_entries:
            self._memory.popitem(last=False)

    def _disable(self, exc: Exception) -> None:
        log.warning("embedding cache file unusable (%s); continuing without it", exc)
        self._db = None
