"""What an in-memory copy of a classifier costs the garbage collector, without a store: the objects
the collector tracks and a full collection's CPU time with a copy of ``--points`` points loaded,
and the CPU time of building a snapshot's records from it (``FrozenMirror.snapshot``, with
and without metadata on each point; it runs in a worker thread, holding the GIL).

    python bench/copy_gc.py [--points 1000000] [--measure collection snapshot]

The copy's dimension is 4: neither measure depends on it. To measure other code, put its
``server`` directory first on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import gc
import time
import uuid
from collections.abc import Callable

import numpy as np

from knn_classifier.server.store.mirror import Mirror
from knn_classifier.server.store.schema import read_payload


def loaded_copy(points: int, metadata: dict[str, str]) -> Mirror:
    """A copy filled page by page (250 points), as a load from the shard fills it."""
    mirror = Mirror(4, capacity=points)
    for start in range(0, points, 250):
        ids = [str(uuid.uuid4()) for _ in range(min(250, points - start))]
        payloads = [
            read_payload(
                {"classifier": "c", "id": i, "label": "l", "text": "t", "metadata": metadata}
            )
            for i in ids
        ]
        mirror.upsert(ids, np.ones((len(ids), 4), dtype=np.float32), payloads)
    return mirror


def cpu_ms(call: Callable[[], object]) -> float:
    start = time.thread_time()
    call()
    return (time.thread_time() - start) * 1e3


def main(points: int, measure: list[str]) -> None:
    if "collection" in measure:
        mirror = loaded_copy(points, {})
        runs = [cpu_ms(gc.collect) for _ in range(3)]
        print(
            f"copy of {points} points: {len(gc.get_objects())} tracked objects,"
            f" full collection's CPU {', '.join(f'{run:.0f}' for run in runs)} ms"
        )
        del mirror
    if "snapshot" in measure:
        for metadata in ({}, {"source": "crm"}):
            frozen = loaded_copy(points, metadata).frozen()
            gc.collect()
            runs = [cpu_ms(frozen.snapshot) for _ in range(3)]
            print(
                f"snapshot of {points} points, metadata {metadata}:"
                f" CPU {', '.join(f'{run:.0f}' for run in runs)} ms"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument(
        "--measure", nargs="+", choices=["collection", "snapshot"], default=["collection"]
    )
    args = parser.parse_args()
    main(args.points, args.measure)
