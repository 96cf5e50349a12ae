"""What the cross-replica write lease costs an AddExemplars on the Qdrant server store.

    python bench/lease_cost.py [--rounds 12] [--adds 50] [--batch 1]

The Qdrant server store on its local stand-in (qdrant-client local mode, in this process),
dimensions 256 and 1024, a zero-cost embedder in a subprocess. Two services in this process,
each on its own in-memory store: one takes the lease (as on a Qdrant server), the other is the
same store told that no other process shares it (no lease). Each round runs ``--adds``
AddExemplars of ``--batch`` new texts on one then the other, the order alternating, and
measures this process's CPU time and the wall time per add; the medians over the rounds are
compared. Store calls on the classifier records per add are counted too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from qdrant_client import AsyncQdrantClient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port
from bench.throughput import http_ok, process
from knn_classifier.server.app import build_embedding
from knn_classifier.server.domain import ExemplarInput, NewClassifier
from knn_classifier.server.service import ClassifierService
from knn_classifier.server.settings import Settings
from knn_classifier.server.store.base import Payload
from knn_classifier.server.store.qdrant_server import QdrantServerStore

WIDTH = 1024


class CountingStore(QdrantServerStore):
    """Counts the calls on meta records (the classifier records)."""

    def __init__(self) -> None:
        super().__init__(AsyncQdrantClient(":memory:"), "knn")
        self.calls: Counter[str] = Counter()

    async def get_meta(self, key: str) -> Payload | None:
        self.calls["get_meta"] += 1
        return await super().get_meta(key)

    async def update_meta(self, key: str, fields: Payload, where: Payload) -> None:
        self.calls["update_meta"] += 1
        await super().update_meta(key, fields, where)


class UnsharedStore(CountingStore):
    """The same store, told that no other process writes it: no lease."""

    shared = False


async def run(args: argparse.Namespace, url: str, data_dir: Path) -> None:
    settings = Settings(
        data_dir=data_dir,
        dimensions=[256, 1024],
        embedding={"base_url": url, "model": "zero", "template": "{text}", "cache_entries": 0},
        server={"health_interval_s": 3600},
    )
    services = {}
    for name, kind in (("lease", CountingStore), ("no lease", UnsharedStore)):
        store = kind()
        service = ClassifierService(settings, build_embedding(settings), store)
        await service.start()
        await service.create_classifier(NewClassifier("c"))
        services[name] = (service, store)
    cpu: dict[str, list[float]] = {name: [] for name in services}
    wall: dict[str, list[float]] = {name: [] for name in services}
    calls: dict[str, Counter[str]] = {name: Counter() for name in services}
    for round_ in range(args.rounds):
        order = list(services) if round_ % 2 == 0 else list(reversed(services))
        for name in order:
            service, store = services[name]
            before = Counter(store.calls)
            started_cpu, started = time.process_time(), time.perf_counter()
            for add in range(args.adds):
                texts = [f"r{round_} a{add} t{t}" for t in range(args.batch)]
                await service.add_exemplars("c", [ExemplarInput(t, "x") for t in texts])
            cpu[name].append((time.process_time() - started_cpu) / args.adds * 1000)
            wall[name].append((time.perf_counter() - started) / args.adds * 1000)
            calls[name] += store.calls - before
    adds = args.rounds * args.adds
    print(f"load average {os.getloadavg()[0]:.2f}; {adds} adds of {args.batch} per side")
    print("| store | CPU ms per add (median of rounds) | wall ms per add | meta calls per add |")
    print("|---|---|---|---|")
    for name in services:
        per_add = ", ".join(f"{k} {v / adds:.1f}" for k, v in sorted(calls[name].items()))
        print(
            f"| {name} | {statistics.median(cpu[name]):.2f} | "
            f"{statistics.median(wall[name]):.2f} | {per_add} |"
        )
    for service, _ in services.values():
        await service.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--adds", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    zero = ["-m", "bench.zero_embedder", "--port", str(port), "--width", str(WIDTH)]
    with (
        process(zero, lambda: http_ok(url.removesuffix("/v1") + "/health")),
        tempfile.TemporaryDirectory(prefix="knn-lease-") as data_dir,
    ):
        asyncio.run(run(args, url, Path(data_dir)))


if __name__ == "__main__":
    main()
