"""Classify latency with label-model voting: the first call after a write, and the calls after.

    python bench/model_cache.py --store qdrant-server   # or --store embedded

The service core (``ClassifierService``, no gRPC) with ``bench.zero_embedder`` in its own
process, one classifier of ``--exemplars`` exemplars in 77 labels at one dimension
(``--dimension``, also the model's width). The Qdrant server store runs on qdrant-client's
local mode (``AsyncQdrantClient(":memory:")``), the stand-in the tests use: pure Python, so its
neighbour query is far slower than a real server's. For each voting method: one exemplar is
added (a write, which moves the classifier's revision), then the first Classify is timed, then
``--calls`` more (median and 90th percentile). similarity_weighted needs no label model: it is
the baseline for the rest of the call. One BLAS thread, as the service runs.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port
from bench.throughput import http_ok, process
from knn_classifier.server.app import build_embedding
from knn_classifier.server.domain import ClassifyOptions, ExemplarInput, NewClassifier
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.settings import Settings
from knn_classifier.server.store import EdgeStore, Store
from knn_classifier.server.voting import Voting

LABELS = 77
BATCH = 500
METHODS = [Voting.SIMILARITY_WEIGHTED, Voting.CENTROID, Voting.DISCRIMINANT]


def build_store(kind: str, data_dir: Path) -> Store:
    if kind == "embedded":
        return EdgeStore(data_dir)
    from qdrant_client import AsyncQdrantClient

    from knn_classifier.server.store.qdrant_server import QdrantServerStore

    return QdrantServerStore(AsyncQdrantClient(location=":memory:"), "bench")


async def timed(service: ClassifierService, text: str, voting: Voting) -> float:
    started = time.perf_counter()
    answers, _ = await service.classify("c", [text], ClassifyOptions(voting=voting))
    elapsed = time.perf_counter() - started
    assert not isinstance(answers[0], Exception), answers
    return elapsed * 1000


async def run(args: argparse.Namespace, base_url: str) -> None:
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            data_dir=Path(data_dir),
            dimensions=[args.dimension],
            embedding={"base_url": base_url, "model": "zero"},
        )
        service = ClassifierService(
            settings, build_embedding(settings), build_store(args.store, Path(data_dir))
        )
        await service.start()
        await service.create_classifier(NewClassifier("c"))
        items = [
            ExemplarInput(f"exemplar {i}", f"label{i % LABELS}") for i in range(args.exemplars)
        ]
        for start in range(0, len(items), BATCH):
            await service.add_exemplars("c", items[start : start + BATCH])
        print(
            f"{args.store} store, {args.exemplars} exemplars x {args.dimension}, {LABELS} labels; "
            "Classify latency in ms"
        )
        print("| voting | first call after a write | next calls: p50 | p90 |")
        print("|---|---|---|---|")
        for method in METHODS:
            await service.add_exemplars("c", [ExemplarInput(f"written before {method}", "label0")])
            first = await timed(service, f"first query {method}", method)
            after = sorted(
                [await timed(service, f"query {i} {method}", method) for i in range(args.calls)]
            )
            p90 = after[min(len(after) - 1, int(0.9 * len(after)))]
            print(f"| {method} | {first:.0f} | {statistics.median(after):.0f} | {p90:.0f} |")
        await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", choices=["embedded", "qdrant-server"], default="qdrant-server")
    parser.add_argument("--exemplars", type=int, default=2_000)
    parser.add_argument("--dimension", type=int, default=1_024)
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    port = free_port()
    zero = ["-m", "bench.zero_embedder", "--port", str(port), "--width", str(args.dimension)]
    with process(zero, lambda: http_ok(f"http://127.0.0.1:{port}/health")):
        asyncio.run(run(args, f"http://127.0.0.1:{port}/v1"))


if __name__ == "__main__":
    main()
