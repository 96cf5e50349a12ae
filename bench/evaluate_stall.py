"""How long Evaluate keeps the server's event loop from running anything else.

    python bench/evaluate_stall.py [--labels 10000] [--per-label 2] [--width 32] [--profile]

The real service in this process (embedded store, one dimension), the fake embedder at a small
width, one classifier of ``--labels`` labels with ``--per-label`` exemplars each. A probe task on
the server's loop sleeps 5 ms at a time and records the longest gap between its wake-ups; while
the loop is blocked, health checks and every other call wait that long. First 10 s with no
call (the floor: on a loaded machine the loop waits for a core too), then one leave-one-out
Evaluate per voting method, then one with apply_best and target_precision. ``--profile`` prints
what ran on the loop's thread during the Evaluate calls (cProfile of that thread only).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import asyncio
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import ServiceThread
from knn_classifier.client import Client
from knn_classifier.server.settings import Settings
from tests.fake_embedder import FakeEmbeddingServer

PROBE_S = 0.005
IDLE_S = 10.0


class Probe:
    """Wakes every PROBE_S on the loop it runs on; remembers the longest gap and the wake-ups."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.wakeups = 0
        self._running = True

    async def run(self) -> None:
        while self._running:
            before = time.perf_counter()
            await asyncio.sleep(PROBE_S)
            self.longest = max(self.longest, time.perf_counter() - before - PROBE_S)
            self.wakeups += 1

    def stop(self) -> None:
        self._running = False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--labels", type=int, default=10_000)
    parser.add_argument("--per-label", type=int, default=2)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument(
        "--voting",
        nargs="*",
        default=["similarity_weighted", "centroid", "discriminant"],
        help="one leave-one-out Evaluate per method listed",
    )
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    embedder = FakeEmbeddingServer().start()
    embedder.reset(width=args.width)
    with tempfile.TemporaryDirectory() as data_dir:
        settings = Settings(
            data_dir=Path(data_dir),
            dimensions=[args.width],
            embedding={
                "base_url": embedder.base_url,
                "model": "fake",
                "template": "{text}",
                "cache_entries": 0,
                "cache_file": False,
            },
            server={"port": 0, "health_interval_s": 3600},
        )
        service = ServiceThread(settings)
        try:
            measure(service, args)
        finally:
            service.stop()
            embedder.stop()


def measure(service: ServiceThread, args: argparse.Namespace) -> None:
    rows = [
        (f"text {i} of label {label} word{label} extra{i}", f"label-{label}")
        for label in range(args.labels)
        for i in range(args.per_label)
    ]
    with Client(service.address, timeout=600) as client:
        client.create_classifier("many")
        for start in range(0, len(rows), 1024):
            client.add_exemplars("many", rows[start : start + 1024])
        print(
            f"{args.labels} labels x {args.per_label} exemplars, width {args.width}; "
            "longest event-loop stall during each leave-one-out Evaluate:"
        )
        print("| Evaluate | seconds | longest stall ms | probe wake-ups |")
        print("|---|---|---|---|")
        profiler = cProfile.Profile() if args.profile else None
        calls: list[tuple[str, Callable[[], object]]] = [
            ("none (idle: the floor)", lambda: time.sleep(IDLE_S))
        ]
        calls += [
            (voting, functools.partial(client.evaluate, "many", voting=[voting]))
            for voting in args.voting
        ]
        calls.append(
            (
                "apply_best, target 0.9",
                functools.partial(client.evaluate, "many", apply_best=True, target_precision=0.9),
            )
        )
        for name, call in calls:
            took, probe = probed(service, call, profiler)
            print(f"| {name} | {took:.2f} | {probe.longest * 1000:.0f} | {probe.wakeups} |")
        if profiler:
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


def probed(
    service: ServiceThread, call: Callable[[], object], profiler: cProfile.Profile | None
) -> tuple[float, Probe]:
    """How long ``call`` took, and the probe that ran on the server's loop meanwhile."""
    loop = service._loop
    probe = Probe()
    task = asyncio.run_coroutine_threadsafe(probe.run(), loop)
    if profiler:
        loop.call_soon_threadsafe(profiler.enable)
    started = time.perf_counter()
    call()
    took = time.perf_counter() - started
    if profiler:
        loop.call_soon_threadsafe(profiler.disable)
    loop.call_soon_threadsafe(probe.stop)
    task.result()
    return took, probe


if __name__ == "__main__":
    main()
