"""How long ``EdgeStore.vectors`` keeps the event loop from running anything else when it answers
from a classifier's in-memory copy (what a label-model refit or an Evaluate asks for).

    python bench/snapshot_stall.py [--points 100000] [--dimension 256] [--runs 5] [--data DIR]

One classifier of ``--points`` random points in an embedded store at ``--data`` (written on the
first run, reused after), loaded into its in-memory copy by a query. A ticker task on the loop
sleeps 1 ms at a time and records the longest gap between its wake-ups while ``vectors`` runs;
first the same time with no call (the floor). Per run: wall time, the loop thread's CPU time
(``time.thread_time`` around the call) and the process's. To measure other code, put its
``server`` directory first on ``PYTHONPATH``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import asyncio
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import numpy as np

from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.schema import exemplar_payload

TICK_S = 0.001


async def longest_gap(call: Awaitable[Any]) -> tuple[float, float, float, float]:
    """Awaits ``call`` beside a 1 ms ticker: the longest gap between ticks, the wall time, the
    loop thread's CPU time and the process's CPU time, all in seconds."""
    done = False
    gap = 0.0

    async def ticker() -> None:
        nonlocal gap
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(TICK_S)
            now = time.perf_counter()
            gap, last = max(gap, now - last), now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(TICK_S)
    wall, thread, process = time.perf_counter(), time.thread_time(), time.process_time()
    await call
    wall, thread, process = (
        time.perf_counter() - wall,
        time.thread_time() - thread,
        time.process_time() - process,
    )
    done = True
    await ticking
    return gap, wall, thread, process


async def main(points: int, dimension: int, runs: int, data: Path) -> None:
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
        await store.query(dimension, "c", np.ones((1, dimension), dtype=np.float32), 1)
        floor = await longest_gap(asyncio.sleep(0.5))
        print(f"floor (0.5 s, no call): longest gap {floor[0] * 1e3:.1f} ms")
        for run in range(runs):
            gap, wall, thread, process = await longest_gap(store.vectors(dimension, "c"))
            print(
                f"run {run}: longest gap {gap * 1e3:.1f} ms, wall {wall * 1e3:.0f} ms,"
                f" loop thread CPU {thread * 1e3:.0f} ms, process CPU {process * 1e3:.0f} ms"
            )
    finally:
        await store.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dimension", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--data", type=Path, default=Path("/tmp/snapshot-stall"))
    args = parser.parse_args()
    asyncio.run(main(args.points, args.dimension, args.runs, args.data))
