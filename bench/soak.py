"""Soak: a mix of Classify, ClassifyBatch and AddExemplars at high concurrency for a while.

    python bench/soak.py [--seconds 600] [--concurrency 64]

Runs the real server as a subprocess on loopback (embedded store in a temporary directory)
against the deterministic fake embedder, drives it with the async client, and reports requests,
errors by status, latency percentiles and the server's resident memory at start and end. Any
error other than RESOURCE_EXHAUSTED is a failure (exit status 1).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port, wait_until_serving
from knn_classifier.client import AsyncClient, KnnClassifierError
from tests.fake_embedder import FakeEmbeddingServer

WORDS = [f"w{i}" for i in range(300)]


@dataclass
class SoakReport:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    rss_start_kb: int = 0
    rss_end_kb: int = 0

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def failures(self) -> int:
        return sum(n for s, n in self.statuses.items() if s not in {"OK", "RESOURCE_EXHAUSTED"})

    def table(self) -> str:
        lines = [
            "| call | requests | p50 ms | p99 ms | max ms |",
            "|---|---|---|---|---|",
        ]
        for kind, values in sorted(self.latencies.items()):
            ordered = sorted(values)
            p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
            lines.append(
                f"| {kind} | {len(values)} | {1000 * statistics.median(ordered):.1f} | "
                f"{1000 * p99:.1f} | {1000 * ordered[-1]:.1f} |"
            )
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        lines += [
            "",
            f"{self.requests} requests in {self.seconds:.0f} s "
            f"({self.requests / self.seconds:.0f}/s); statuses {statuses}; "
            f"failures {self.failures}",
            f"server RSS {self.rss_start_kb / 1024:.0f} MiB at start, "
            f"{self.rss_end_kb / 1024:.0f} MiB at end",
        ]
        return "\n".join(lines)


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def text(rng: random.Random) -> str:
    return " ".join(rng.sample(WORDS, 6))


async def worker(client: AsyncClient, report: SoakReport, until: float, seed: int) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        roll = rng.random()
        started = time.perf_counter()
        if roll < 0.7:
            kind, call = "Classify", client.classify("soak", text(rng))
        elif roll < 0.9:
            kind, call = (
                "ClassifyBatch(16)",
                client.classify_batch("soak", [text(rng) for _ in range(16)]),
            )
        else:
            items = [(text(rng), f"label{rng.randrange(20)}") for _ in range(4)]
            kind, call = "AddExemplars(4)", client.add_exemplars("soak", items)
        try:
            await call
            report.statuses["OK"] += 1
            report.latencies[kind].append(time.perf_counter() - started)
        except KnnClassifierError as error:
            report.statuses[error.code.name] += 1


async def drive(address: str, seconds: float, concurrency: int, report: SoakReport) -> None:
    rng = random.Random(0)
    async with AsyncClient(address, timeout=30) as client:
        await client.create_classifier("soak")
        seed = [(text(rng), f"label{i % 20}") for i in range(1000)]
        await client.add_exemplars("soak", seed)
        until = time.monotonic() + seconds
        await asyncio.gather(*(worker(client, report, until, i) for i in range(concurrency)))


def run_soak(seconds: float, concurrency: int, embedder_url: str, data_dir: Path) -> SoakReport:
    port = free_port()
    env = {
        **os.environ,
        "KNN_DATA_DIR": str(data_dir),
        "KNN_DIMENSIONS": "64,256",
        "KNN_EMBEDDING__BASE_URL": embedder_url,
        "KNN_EMBEDDING__TEMPLATE": "{text}",
        "KNN_SERVER__HOST": "127.0.0.1",
        "KNN_SERVER__PORT": str(port),
        "KNN_LOG_LEVEL": "WARNING",
    }
    server = subprocess.Popen([sys.executable, "-m", "knn_classifier.server"], env=env)
    report = SoakReport(seconds)
    try:
        wait_until_serving(f"127.0.0.1:{port}")
        report.rss_start_kb = rss_kb(server.pid)
        asyncio.run(drive(f"127.0.0.1:{port}", seconds, concurrency, report))
        report.rss_end_kb = rss_kb(server.pid)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    embedder = FakeEmbeddingServer().start()
    embedder.reset(width=256)
    try:
        with tempfile.TemporaryDirectory(prefix="knn-soak-") as data_dir:
            report = run_soak(args.seconds, args.concurrency, embedder.base_url, Path(data_dir))
    finally:
        embedder.stop()
    print(f"soak: concurrency {args.concurrency}, {args.seconds:.0f} s, fake embedder, loopback")
    print(report.table())
    sys.exit(1 if report.failures else 0)


if __name__ == "__main__":
    main()
