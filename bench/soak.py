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
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port, wait_until_serving
from knn_classifier.client import AsyncClient, KnnClassifierError
from knn_classifier.client._requests import VotingName
from knn_classifier.server.exemplar_writes import derived_exemplar_id
from knn_classifier.server.store import EdgeStore
from tests.fake_embedder import FakeEmbeddingServer

T = TypeVar("T")
DIMENSIONS = [64, 256]
WORDS = [f"w{i}" for i in range(300)]
CHURNING = 8
"""Workers 0..CHURNING-1 each own a classifier they create, fill, empty and delete again."""
CHURN_VOTING: list[VotingName] = ["similarity_weighted", "centroid", "discriminant"]
"""Label models are refitted after every write: churn exercises them too."""
EXPECTED = {"OK", "RESOURCE_EXHAUSTED"}
"""Statuses that are not failures; classifying a churning classifier may also meet NOT_FOUND
or FAILED_PRECONDITION (it is being deleted, or has no exemplars yet)."""
EXPECTED_WHILE_CHURNING = EXPECTED | {"NOT_FOUND", "FAILED_PRECONDITION"}
MAYBE_WRITTEN = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN", "CANCELLED"}
"""Failures after which a write may or may not have happened."""


@dataclass
class Ledger:
    """What the server acknowledged, per classifier: the exemplars it holds (id -> label) and
    the ids whose fate is unknown (a write that failed in a way that may have written)."""

    exemplars: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    uncertain: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))

    def added(self, classifier: str, ids: list[str], labels: list[str]) -> None:
        self.exemplars[classifier].update(zip(ids, labels, strict=True))

    def deleted(self, classifier: str, ids: list[str]) -> None:
        for exemplar_id in ids:
            self.exemplars[classifier].pop(exemplar_id, None)

    def dropped(self, classifier: str) -> None:
        self.exemplars.pop(classifier, None)
        self.uncertain.pop(classifier, None)


@dataclass
class SoakReport:
    seconds: float
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    statuses: Counter[str] = field(default_factory=Counter)
    failures_by_call: Counter[str] = field(default_factory=Counter)
    rss_start_kb: int = 0
    rss_end_kb: int = 0
    ledger: Ledger = field(default_factory=Ledger)
    checked: int = 0
    """Acknowledged exemplars checked in the store after the run."""
    missing: list[str] = field(default_factory=list)
    """Acknowledged exemplars absent (or with another label) in some dimension."""
    orphans: list[str] = field(default_factory=list)
    """Stored exemplars nobody acknowledged, or of a classifier that has no record."""

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def failures(self) -> int:
        return sum(self.failures_by_call.values())

    @property
    def sound(self) -> bool:
        """No failed call, nothing acknowledged missing, nothing unacknowledged stored."""
        return not (self.failures or self.missing or self.orphans)

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
        failed = ", ".join(f"{s}: {n}" for s, n in sorted(self.failures_by_call.items()))
        lines += [
            "",
            f"{self.requests} requests in {self.seconds:.0f} s "
            f"({self.requests / self.seconds:.0f}/s); statuses {statuses}; "
            f"failures {self.failures}{f' ({failed})' if failed else ''}",
            f"after the run: {self.checked} acknowledged exemplars checked in every dimension, "
            f"{len(self.missing)} missing, {len(self.orphans)} orphans",
            f"server RSS {self.rss_start_kb / 1024:.0f} MiB at start, "
            f"{self.rss_end_kb / 1024:.0f} MiB at end",
        ]
        return "\n".join(
            lines
            + [f"missing: {m}" for m in self.missing[:10]]
            + [f"orphan: {o}" for o in self.orphans[:10]]
        )


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def text(rng: random.Random, owner: int) -> str:
    """Six random words and the worker's tag: workers never write each other's exemplars."""
    return " ".join([*rng.sample(WORDS, 6), f"by{owner}"])


class Worker:
    """One client coroutine's loop; workers below CHURNING also churn their own classifier."""

    def __init__(self, client: AsyncClient, report: SoakReport, index: int) -> None:
        self.client = client
        self.report = report
        self.index = index
        self.rng = random.Random(index)
        self.mine: list[str] = []
        """Ids this worker added to "soak" and has not deleted."""
        self.churned = f"churn-{index}"
        self.churned_exists = False

    async def run(self, until: float) -> None:
        while time.monotonic() < until:
            roll = self.rng.random()
            if self.index < CHURNING and roll < 0.1:
                await self.churn()
            elif roll < 0.65:
                await self.timed("Classify", self.client.classify("soak", self.text()))
            elif roll < 0.7:
                target = f"churn-{self.rng.randrange(CHURNING)}"
                await self.timed(
                    "Classify(churning)", self.client.classify(target, self.text()), churning=True
                )
            elif roll < 0.85:
                texts = [self.text() for _ in range(16)]
                await self.timed("ClassifyBatch(16)", self.client.classify_batch("soak", texts))
            elif roll < 0.95:
                await self.add("soak", "AddExemplars(4)")
            else:
                await self.delete_some("soak", self.mine, "DeleteExemplars(2)")

    def text(self) -> str:
        return text(self.rng, self.index)

    async def churn(self) -> None:
        if not self.churned_exists:
            status, _ = await self.timed(
                "CreateClassifier",
                self.client.create_classifier(self.churned, voting=CHURN_VOTING[self.index % 3]),
            )
            self.churned_exists = status in {"OK", "ALREADY_EXISTS", *MAYBE_WRITTEN}
            return
        roll = self.rng.random()
        if roll < 0.6:
            await self.add(self.churned, "AddExemplars(4)")
        elif roll < 0.8:
            ids = list(self.report.ledger.exemplars[self.churned])
            await self.delete_some(self.churned, ids, "DeleteExemplars(2)")
        else:
            status, _ = await self.timed(
                "DeleteClassifier", self.client.delete_classifier(self.churned)
            )
            if status in MAYBE_WRITTEN:
                ledger = self.report.ledger
                ledger.uncertain[self.churned].update(ledger.exemplars[self.churned])
            else:
                self.report.ledger.dropped(self.churned)
                self.churned_exists = False

    async def add(self, classifier: str, kind: str) -> None:
        items = [(self.text(), f"label{self.rng.randrange(20)}") for _ in range(4)]
        status, ids = await self.timed(kind, self.client.add_exemplars(classifier, items))
        if status in MAYBE_WRITTEN:
            self.report.ledger.uncertain[classifier].update(
                derived_exemplar_id(classifier, t) for t, _ in items
            )
        if ids is None:
            return
        self.report.ledger.added(classifier, ids, [label for _, label in items])
        if classifier == "soak":
            self.mine.extend(ids)

    async def delete_some(self, classifier: str, ids: list[str], kind: str) -> None:
        if len(ids) < 2:
            return
        doomed = self.rng.sample(ids, 2)
        status, _ = await self.timed(kind, self.client.delete_exemplars(classifier, ids=doomed))
        if status in MAYBE_WRITTEN:
            self.report.ledger.uncertain[classifier].update(doomed)
        elif status != "OK":
            return
        self.report.ledger.deleted(classifier, doomed)
        for exemplar_id in doomed:
            if exemplar_id in self.mine:
                self.mine.remove(exemplar_id)

    async def timed(
        self, kind: str, call: Awaitable[T], churning: bool = False
    ) -> tuple[str, T | None]:
        """The call's status name and result (None unless OK); counts statuses and failures."""
        started = time.perf_counter()
        try:
            result = await call
        except KnnClassifierError as error:
            status = error.code.name
            self.report.statuses[status] += 1
            if status not in (EXPECTED_WHILE_CHURNING if churning else EXPECTED):
                self.report.failures_by_call[f"{kind} {status}"] += 1
            return status, None
        self.report.statuses["OK"] += 1
        self.report.latencies[kind].append(time.perf_counter() - started)
        return "OK", result


async def drive(address: str, seconds: float, concurrency: int, report: SoakReport) -> None:
    rng = random.Random(0)
    async with AsyncClient(address, timeout=30) as client:
        await client.create_classifier("soak")
        seed = [(text(rng, -1), f"label{i % 20}") for i in range(1000)]
        ids = await client.add_exemplars("soak", seed)
        report.ledger.added("soak", ids, [label for _, label in seed])
        until = time.monotonic() + seconds
        workers = [Worker(client, report, i) for i in range(concurrency)]
        await asyncio.gather(*(w.run(until) for w in workers))


async def check_store(data_dir: Path, dimensions: list[int], report: SoakReport) -> None:
    """Compares the stopped server's store with what it acknowledged, in every dimension."""
    store = EdgeStore(data_dir)
    await store.open(dimensions)
    try:
        records = {str(p["name"]) for p in await store.list_meta("classifier")}
        names = {"soak", *(f"churn-{i}" for i in range(CHURNING))}
        for name in sorted(names):
            expected = report.ledger.exemplars.get(name, {})
            uncertain = report.ledger.uncertain.get(name, set())
            for dimension in dimensions:
                points, _ = await store.vectors(dimension, name)
                stored = {str(r.payload["id"]): str(r.payload["label"]) for r in points}
                if name not in records:
                    report.orphans += [f"{name}/{i} (no record, d{dimension})" for i in stored]
                    continue
                report.missing += [
                    f"{name}/{i} in d{dimension}"
                    for i, label in expected.items()
                    if stored.get(i) != label and i not in uncertain
                ]
                report.orphans += [
                    f"{name}/{i} in d{dimension}"
                    for i in stored
                    if i not in expected and i not in uncertain
                ]
            report.checked += len(expected)
    finally:
        await store.close()


def run_soak(seconds: float, concurrency: int, embedder_url: str, data_dir: Path) -> SoakReport:
    port = free_port()
    env = {
        **os.environ,
        "KNN_DATA_DIR": str(data_dir),
        "KNN_DIMENSIONS": ",".join(map(str, DIMENSIONS)),
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
    asyncio.run(check_store(data_dir, DIMENSIONS, report))
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
    sys.exit(0 if report.sound else 1)


if __name__ == "__main__":
    main()
