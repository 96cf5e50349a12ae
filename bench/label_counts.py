"""CPU time of ListLabels' store reads on the embedded store, by exemplar count.

    python bench/label_counts.py --exemplars 10000 50000

One classifier of random vectors (``--dimension``) in 77 labels, written straight into an
``EdgeStore`` (no service, no embedder). Two ways of counting, alternated ``--rounds`` times and
given as the median of ``time.process_time``: the unfiltered label facet (what ListLabels read
for a classifier not marked as holding negatives, before it counted by the flag always) and the
in-scope label facet plus the count of negatives (what it reads now). The filters test whether
the ``out_of_scope`` key is there; run it on a commit before the shards indexed that key to see
what the filter costs without the index.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.schema import exemplar_payload

LABELS = 77


async def filled(data_dir: Path, exemplars: int, dimension: int) -> EdgeStore:
    store = EdgeStore(data_dir)
    await store.open([dimension])
    rng = np.random.default_rng(0)
    for start in range(0, exemplars, 1000):
        ids = [str(uuid.uuid4()) for _ in range(start, min(exemplars, start + 1000))]
        payloads = [
            exemplar_payload("c", point, f"l{(start + i) % LABELS}", "text", {}, 0.0)
            for i, point in enumerate(ids)
        ]
        vectors = rng.normal(size=(len(ids), dimension)).astype(np.float32)
        await store.upsert(dimension, ids, vectors, payloads)
    return store


async def cpu_ms(read: Callable[[], Awaitable[object]]) -> float:
    started = time.process_time()
    await read()
    return 1000 * (time.process_time() - started)


async def measure(exemplars: int, dimension: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        store = await filled(Path(scratch), exemplars, dimension)

        async def unfiltered() -> None:
            await store.label_counts(dimension, "c", None)

        async def by_flag() -> None:
            await store.count(dimension, Selection("c", out_of_scope=True))
            await store.label_counts(dimension, "c", False)

        times: dict[str, list[float]] = {"unfiltered facet": [], "by flag (facet + count)": []}
        for _ in range(rounds):
            times["unfiltered facet"].append(await cpu_ms(unfiltered))
            times["by flag (facet + count)"].append(await cpu_ms(by_flag))
        await store.close()
    for name, values in times.items():
        print(f"{exemplars:>7} exemplars  {name:<24} {statistics.median(values):7.1f} ms CPU")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--exemplars", type=int, nargs="+", default=[10_000, 50_000])
    parser.add_argument("--dimension", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    for exemplars in args.exemplars:
        asyncio.run(measure(exemplars, args.dimension, args.rounds))


if __name__ == "__main__":
    main()
