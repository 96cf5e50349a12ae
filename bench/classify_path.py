"""CPU per cache-hit Classify through the service's own Python, without gRPC's core.

    python bench/classify_path.py                      # CPU per call, lowest of 5 rounds
    python bench/classify_path.py --profile            # and cProfile's time by part of a call
    PYTHONPATH=../old/server:../old/client python bench/classify_path.py   # another checkout

The service is built as ``python -m knn_classifier.server`` builds it (``App`` with the embedded
store, dimension 1024, the zero-cost embedder over HTTP, 100 exemplars in the queried classifier
as in bench/throughput.py's 1k row), and started; then each call goes as gRPC would take it,
minus gRPC's core: the handler the App registered for the method (and, for a checkout that
still uses grpc.aio's interceptors, the interceptor chain, run per call as grpc.aio runs it) gets
the request's bytes, and the response is serialised. Calls run
one after another on one event loop, every text a cache hit, so the CPU time per call
(``time.process_time``, this process) moves far less with other load on the machine than the
end-to-end figures: it is the measure for one change at a time. What it leaves out (gRPC's core
and its Cython server, the sockets) is what ``bench/profile_classify.py --echo`` measures.
"""

from __future__ import annotations

import os

# As the server's __main__ does, before numpy loads OpenBLAS: idle workers spin otherwise.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import asyncio
import cProfile
import functools
import pstats
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import Context, Details, free_port
from bench.profile_classify import GRPC, part_of
from bench.throughput import LABELS, WIDTH, classify_request, http_ok, process, sentence
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

METHOD = "/knn_classifier.v1.ClassifierService/Classify"
EXEMPLARS = 100
HOT_TEXTS = 256


def captured() -> tuple[list[Any], list[Any], dict[str, Any]]:
    """Records the interceptors the App gives grpc.aio, the servicer it registers and the
    handlers it registers by method name, so any version of the App can be driven the same
    way."""
    interceptors: list[Any] = []
    servicers: list[Any] = []
    handlers: dict[str, Any] = {}
    make_server = grpc.aio.server
    register = pb_grpc.add_ClassifierServiceServicer_to_server

    def server(*args: Any, **kwargs: Any) -> Any:
        interceptors.extend(kwargs.get("interceptors") or ())
        made = make_server(*args, **kwargs)
        add_handlers = made.add_registered_method_handlers  # type: ignore[attr-defined]

        def add_registered(service: str, by_name: dict[str, Any]) -> None:
            handlers.update({f"/{service}/{name}": h for name, h in by_name.items()})
            add_handlers(service, by_name)

        made.add_registered_method_handlers = add_registered  # type: ignore[attr-defined]
        return made

    def add(servicer: Any, server: Any) -> None:
        servicers.append(servicer)
        register(servicer, server)

    grpc.aio.server = server
    pb_grpc.add_ClassifierServiceServicer_to_server = add
    return interceptors, servicers, handlers


async def handler_for(interceptors: list[Any], final: Any, details: Details) -> Any:
    """The handler the chain gives for ``details``, run as grpc.aio runs it."""

    async def run(i: int, details: Details) -> Any:
        if i == len(interceptors):
            return final
        return await interceptors[i].intercept_service(functools.partial(run, i + 1), details)

    return await run(0, details)


async def setup(url: str, data_dir: Path) -> tuple[Any, Callable[[int], Awaitable[bytes]]]:
    """The started App, and a function doing call ``n`` (a cache hit) end to end."""
    os.environ.update(
        {
            "KNN_EMBEDDING__MODEL": "zero",
            "KNN_DATA_DIR": str(data_dir),
            "KNN_DIMENSIONS": "1024",
            "KNN_EMBEDDING__BASE_URL": url,
            "KNN_EMBEDDING__TEMPLATE": "{text}",
            "KNN_SERVER__PORT": str(free_port()),
            "KNN_SERVER__HOST": "127.0.0.1",
            "KNN_LOG_LEVEL": "WARNING",
            "KNN_SERVER__HEALTH_INTERVAL_S": "3600",
        }
    )
    interceptors, servicers, handlers = captured()
    from knn_classifier.server.app import App
    from knn_classifier.server.settings import Settings

    app = App(Settings())
    await app.start()
    servicer = servicers[0]
    context = Context(())
    await servicer.CreateClassifier(pb.CreateClassifierRequest(name="c0"), context)
    import random

    rng = random.Random(EXEMPLARS)
    exemplars = [
        pb.ExemplarInput(text=f"{i} {sentence(rng)}", label=f"l{i % LABELS}")
        for i in range(EXEMPLARS)
    ]
    await servicer.AddExemplars(
        pb.AddExemplarsRequest(classifier="c0", exemplars=exemplars), context
    )
    final = handlers[METHOD]
    hot = [classify_request(1024, "hot", 0, n).SerializeToString() for n in range(HOT_TEXTS)]
    metadata = (("user-agent", "grpc-python-asyncio/1.85"),)
    details = Details(METHOD, metadata)
    call_context = Context(metadata)

    async def call(n: int) -> bytes:
        handler = await handler_for(interceptors, final, details)
        response = await handler.unary_unary(hot[n % len(hot)], call_context)
        return bytes(handler.response_serializer(response))

    for n in range(len(hot)):  # embeds them: every later call is a cache hit
        await call(n)
    return app, call


async def measure(args: argparse.Namespace) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    zero = ["-m", "bench.zero_embedder", "--port", str(port), "--width", str(WIDTH)]
    with (
        process(zero, lambda: http_ok(url.removesuffix("/v1") + "/health")),
        tempfile.TemporaryDirectory(prefix="knn-bench-") as directory,
    ):
        app, call = await setup(url, Path(directory))
        rounds = []
        for _ in range(args.rounds):
            started = time.process_time()
            for n in range(args.calls):
                await call(n)
            rounds.append((time.process_time() - started) / args.calls * 1e6)
        print(
            "bench/classify_path.py: CPU per cache-hit Classify without gRPC's core, us: "
            + ", ".join(f"{r:.0f}" for r in rounds)
            + f"; lowest {min(rounds):.0f}"
        )
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for n in range(args.calls):
                await call(n)
            profiler.disable()
            report(pstats.Stats(profiler), min(rounds))
        await app.stop(grace=0)


def report(stats: pstats.Stats, us_per_call: float) -> None:
    """cProfile's own time per function, summed by part of a call (bench/profile_classify.py's
    parts, by the function's file), scaled to the unprofiled CPU per call."""
    parts: Counter[str] = Counter()
    for (filename, line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        part = part_of([f"{name} ({filename}:{line})"])
        parts["asyncio and the chain's plumbing" if part == GRPC else part] += row[2]
    total = sum(parts.values())
    if os.environ.get("TOP"):
        stats.sort_stats("tottime").print_stats(int(os.environ["TOP"]))
    print("\n| part | share of the time | us per call |\n|---|---|---|")
    for part, seconds in parts.most_common():
        print(f"| {part} | {seconds / total:.1%} | {us_per_call * seconds / total:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=3000, help="calls per round")
    parser.add_argument("--profile", action="store_true", help="one more round under cProfile")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
