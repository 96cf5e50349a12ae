"""What a query of an in-memory copy costs the thread that runs it, beside its work estimate
(``mirror.query_work``) and what a thread hop costs the event loop: the figures behind
``QUERY_OFF_LOOP_WORK`` (docs/reliability.md).

    python bench/query_cost.py [--reps 5]

Per copy size (points x dimension, random vectors) and query (vectors x k): the least CPU time
of ``Mirror.query`` over ``--reps`` calls (``time.thread_time``, after one call to warm up), and
the estimate in millions of multiply-adds. Then a thousand ``run_in_executor`` round trips of a
no-op: the event loop thread's CPU time and the wall time per hop.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import asyncio
import time
import uuid

import numpy as np

from knn_classifier.server.store.mirror import Mirror, query_work
from knn_classifier.server.store.schema import exemplar_payload

SIZES = [(1_000, 256), (1_000, 1_024), (10_000, 256), (10_000, 1_024), (100_000, 256)]
QUERIES = [(1, 10), (1, 200), (8, 10), (64, 10), (256, 200)]


def filled(points: int, dimension: int) -> Mirror:
    mirror = Mirror(dimension, points)
    ids = [str(uuid.uuid4()) for _ in range(points)]
    vectors = np.random.default_rng(0).standard_normal((points, dimension), dtype=np.float32)
    mirror.upsert(ids, vectors, [exemplar_payload("c", i, "l", "t", {}, 0) for i in ids])
    return mirror


def least_cpu(mirror: Mirror, vectors: np.ndarray, k: int, reps: int) -> float:
    mirror.query(vectors, k)
    least = float("inf")
    for _ in range(reps):
        start = time.thread_time()
        mirror.query(vectors, k)
        least = min(least, time.thread_time() - start)
    return least


async def hop() -> tuple[float, float]:
    """The event loop thread's CPU time and the wall time of one hop to a worker thread."""
    loop = asyncio.get_running_loop()
    for _ in range(50):
        await loop.run_in_executor(None, int)
    thread, wall = time.thread_time(), time.perf_counter()
    for _ in range(1_000):
        await loop.run_in_executor(None, int)
    return (time.thread_time() - thread) / 1_000, (time.perf_counter() - wall) / 1_000


def main(reps: int) -> None:
    rng = np.random.default_rng(1)
    for points, dimension in SIZES:
        mirror = filled(points, dimension)
        for queries, k in QUERIES:
            vectors = rng.standard_normal((queries, dimension), dtype=np.float32)
            cpu = least_cpu(mirror, vectors, k, reps)
            work = query_work(queries, points, dimension, k)
            print(
                f"{points} x {dimension}, {queries} x k={k}: {cpu * 1e3:.3f} ms CPU,"
                f" estimate {work / 1e6:.0f} M"
            )
    thread, wall = asyncio.run(hop())
    print(f"hop: loop thread CPU {thread * 1e3:.3f} ms, wall {wall * 1e3:.3f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    main(parser.parse_args().reps)
