"""Issue 11's probe of defect 11: ClassifyBatch(256 texts, k=200, include_neighbours) over 200
exemplars of 7,100 characters asks for a 364 MB response. Prints how the server answers, how long
it takes and the process's RSS (server and client share the process), then the same call
without neighbours and 1,024 texts at k=50.

    .venv/bin/python bench/oversized_response.py
"""

from __future__ import annotations

import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knn_classifier.client import Client, ResourceExhaustedError
from tests.conftest import ServerThread, make_settings
from tests.fake_embedder import FakeEmbeddingServer


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    embedder = FakeEmbeddingServer().start()
    embedder.behaviour.max_input_chars = 10_000
    server = ServerThread(make_settings(Path(tempfile.mkdtemp()), embedder.base_url)).start()
    try:
        with Client(server.address, timeout=600) as client:
            client.create_classifier("long")
            for part in range(4):
                items = [(f"{part}-{i:03d} " + "z" * 7100, "ab"[i % 2]) for i in range(50)]
                client.add_exemplars("long", items)
            texts = [f"query {i}" for i in range(256)]
            before, started = rss_mb(), time.perf_counter()
            try:
                client.classify_batch(
                    "long", texts, k=200, include_neighbours=True, min_similarity=-1
                )
                outcome = "answered"
            except ResourceExhaustedError as error:
                outcome = f"refused: {error.reason} {error.metadata}"
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(f"256 texts, k=200, with neighbours: {outcome}")
            print(
                f"  {time.perf_counter() - started:.2f} s; RSS {before:.0f} -> {rss_mb():.0f} MB "
                f"(peak {peak:.0f} MB)"
            )
            for count, k in ((256, 200), (1024, 50)):
                started = time.perf_counter()
                queries = [f"query {i}" for i in range(count)]
                client.classify_batch("long", queries, k=k, min_similarity=-1)
                print(
                    f"{count} texts, k={k}, no neighbours: {time.perf_counter() - started:.2f} s; "
                    f"RSS {rss_mb():.0f} MB"
                )
    finally:
        server.stop()
        embedder.stop()


if __name__ == "__main__":
    main()
