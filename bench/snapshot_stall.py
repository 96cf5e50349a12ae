"""How long the embedded store's calls keep the event loop from running anything else: a snapshot
of a classifier's in-memory copy (``EdgeStore.vectors``, what a label-model refit or an Evaluate
asks for), the first load of a copy (the first query of a classifier), and the calls of Classify,
AddExemplars, DeleteExemplars and ListExemplars; and what a full garbage collection costs with
the copy loaded (``gc``).

    python bench/snapshot_stall.py [--points 100000] [--dimension 256] [--runs 5] [--data DIR]
        [--measure snapshot load calls gc]

One classifier of ``--points`` random points in an embedded store at ``--data`` (written on the
first run, reused after). A ticker task on the loop sleeps 1 ms at a time and records the longest
gap between its wake-ups while the call runs; first half a second with no call (the floor; the
ticker's own wake-ups cost the loop thread some CPU). Per run: wall time, the loop thread's CPU
time (``time.thread_time`` around the call), the process's, and the longest garbage collection
meanwhile (it holds the GIL throughout, in whichever thread set it off). ``snapshot`` and
``calls`` measure a store whose copy a query loaded; ``load`` measures the first query of a
store opened afresh for each run; ``gc`` counts the objects the collector tracks and times a full
collection (``gc.collect()``, the loop thread's CPU) before the load, after it, and while a
snapshot's records are held. To measure other code, put its ``server`` directory first on
``PYTHONPATH``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import asyncio
import gc
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np

from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.base import Matrix
from knn_classifier.server.store.schema import exemplar_payload

TICK_S = 0.001


async def longest_gap(call: Awaitable[Any]) -> tuple[float, float, float, float, float]:
    """Awaits ``call`` beside a 1 ms ticker: the longest gap between ticks, the wall time, the
    loop thread's CPU time, the process's CPU time and the longest garbage collection (which
    holds the GIL throughout, in whichever thread triggered it), all in seconds."""
    done = False
    gap = 0.0
    collection = [0.0, 0.0]  # the running one's start, the longest

    def timed(phase: str, _: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            collection[0] = now
        else:
            collection[1] = max(collection[1], now - collection[0])

    async def ticker() -> None:
        nonlocal gap
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gap, last = max(gap, now - last), now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(TICK_S)
    gc.callbacks.append(timed)
    wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
    try:
        await call
    finally:
        gc.callbacks.remove(timed)
    wall, thread, process = (
        time.perf_counter() - wall,
        time.thread_time() - thread,
        time.process_time() - process,
    )
    done = True
    await ticking
    return gap, wall, thread, process, collection[1]


async def main(points: int, dimension: int, runs: int, data: Path, measure: list[str]) -> None:
    await write_classifier(points, dimension, data)
    store = EdgeStore(data)
    await store.open([dimension])
    try:
        probe = np.ones((1, dimension), dtype=np.float32)
        if "gc" in measure:
            report_collection("before the load")
        await store.query(dimension, "c", probe, 1)
        if "gc" in measure:
            for run in range(runs):
                report_collection(f"copy loaded, run {run}")
            held = await store.vectors(dimension, "c")
            for run in range(runs):
                report_collection(f"copy loaded, a snapshot held, run {run}")
            del held
        report("floor (0.5 s, no call)", await longest_gap(asyncio.sleep(0.5)))
        if "snapshot" in measure:
            for run in range(runs):
                report(f"snapshot run {run}", await longest_gap(store.vectors(dimension, "c")))
        if "calls" in measure:
            for run in range(runs):
                for name, call in calls(store, dimension, run):
                    report(f"{name} run {run}", await longest_gap(call))
    finally:
        await store.close()
    if "load" in measure:
        for run in range(runs):
            fresh = EdgeStore(data)
            await fresh.open([dimension])
            try:
                report(
                    f"first load run {run}",
                    await longest_gap(fresh.query(dimension, "c", probe, 1)),
                )
            finally:
                await fresh.close()


async def write_classifier(points: int, dimension: int, data: Path) -> None:
    store = EdgeStore(data)
    await store.open([dimension])
    try:
        if not await store.count(dimension, Selection("c")):
            rng = np.random.default_rng(0)
            for start in range(0, points, 5_000):
                size = min(5_000, points - start)
                ids = [str(uuid.uuid4()) for _ in range(size)]
                payloads = [
                    exemplar_payload("c", i, f"l{n % 100}", f"text {n}", {}, 0)
                    for n, i in enumerate(ids, start)
                ]
                vectors = rng.standard_normal((size, dimension)).astype(np.float32)
                await store.upsert(dimension, ids, vectors, payloads)
    finally:
        await store.close()


def calls(store: EdgeStore, dimension: int, run: int) -> list[tuple[str, Awaitable[Any]]]:
    """The store's calls behind Classify (one text at k=10; 256 texts at k=200, the most one
    call may ask for; in-scope neighbours only, as for a classifier holding negatives),
    AddExemplars (1,024 exemplars, the largest batch), DeleteExemplars (those 1,024 by id) and
    ListExemplars (a page of 1,000, the largest)."""
    rng = np.random.default_rng(run)

    def normal(rows: int) -> Matrix:
        return rng.standard_normal((rows, dimension)).astype(np.float32)

    ids = [str(uuid.uuid4()) for _ in range(1024)]
    payloads = [exemplar_payload("c", i, "added", "added", {}, 0) for i in ids]
    return [
        ("query 1x10", store.query(dimension, "c", normal(1), 10)),
        ("query 256x200", store.query(dimension, "c", normal(256), 200)),
        (
            "query in scope 1x10",
            store.query(dimension, "c", normal(1), 10, False),
        ),
        (
            "upsert 1024",
            store.upsert(dimension, ids, normal(1024), payloads),
        ),
        ("delete 1024 ids", store.delete(dimension, Selection("c", ids=ids))),
        ("scroll 1000", store.scroll(dimension, Selection("c"), 1000, None)),
    ]


def report(name: str, measured: tuple[float, float, float, float, float]) -> None:
    gap, wall, thread, process, collection = (value * 1e3 for value in measured)
    print(
        f"{name}: longest gap {gap:.1f} ms, wall {wall:.0f} ms,"
        f" loop thread CPU {thread:.0f} ms, process CPU {process:.0f} ms,"
        f" longest gc {collection:.0f} ms"
    )


def report_collection(name: str) -> None:
    thread = time.thread_time()
    gc.collect()
    thread = time.thread_time() - thread
    print(
        f"{name}: {len(gc.get_objects())} tracked objects,"
        f" full collection's CPU {thread * 1e3:.0f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("/tmp/snapshot-stall"))
    parser.add_argument(
        "--measure", nargs="+", choices=["snapshot", "load", "calls", "gc"], default=["snapshot"]
    )
    args = parser.parse_args()
    asyncio.run(main(args.points, args.dimension, args.runs, args.data, args.measure))
