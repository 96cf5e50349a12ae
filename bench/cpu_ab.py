"""CPU per unary Classify at c=64 of two checkouts' servers side by side, rounds interleaved.

    python bench/cpu_ab.py --other ../main                 # new texts (embedding calls)
    python bench/cpu_ab.py --other ../main --hits          # cache hits (no embedding call)

Both services run at once (``python -m knn_classifier.server``, embedded store, one zero-cost
embedder, 1k exemplars, dimension 1024): this checkout's and ``--other``'s (its ``server/`` and
``client/`` first on the path). Each round measures one then the other, the order alternating,
so both see the same load on a shared machine; the CPU the server process spends per answered
call (/proc, every thread) is the figure, and the medians over the rounds are compared.
Sequential runs of ``cpu_per_classify.py`` on a loaded machine differ by more than a change of
0.1 ms per call; interleaved rounds do not.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import statistics
import sys
import tempfile
from contextlib import AsyncExitStack
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.cpu_per_classify import cpu_s
from bench.harness import free_port, serving
from bench.profile_classify import DIMENSION, HOT_TEXTS, cpu_ms_per_call, server_env
from bench.throughput import WIDTH, classify_request, closed_loop, http_ok, load_exemplars, process
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

ROOT = Path(__file__).resolve().parents[1]


async def new_texts_ms(stub: pb_grpc.ClassifierServiceAsyncStub, pid: int, tag: str) -> float:
    """CPU ms per call of ``pid`` while 64 workers classify texts never seen before."""
    before = cpu_s(pid)
    run = await closed_loop(
        lambda w, n: stub.Classify(classify_request(DIMENSION, tag, w, n)), 64, 4.0
    )
    return (cpu_s(pid) - before) / len(run.latencies) * 1000


async def measure(args: argparse.Namespace) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/v1"
    zero = ["-m", "bench.zero_embedder", "--port", str(port), "--width", str(WIDTH)]
    hot = [classify_request(DIMENSION, "hot", 0, n) for n in range(HOT_TEXTS)]
    servers: dict[str, tuple[pb_grpc.ClassifierServiceAsyncStub, int]] = {}
    async with AsyncExitStack() as stack:
        stack.enter_context(process(zero, lambda: http_ok(url.removesuffix("/v1") + "/health")))
        for name, path in (("this checkout", str(ROOT)), (args.other, args.other)):
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="knn-ab-")))
            server_port = free_port()
            address = f"127.0.0.1:{server_port}"
            env = server_env(argparse.Namespace(server_path=path), url, directory, server_port)
            command = ["-m", "knn_classifier.server"]
            child = stack.enter_context(process(command, functools.partial(serving, address), env))
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(address))
            stub = pb_grpc.ClassifierServiceStub(channel)
            await load_exemplars(stub, 1000)
            for request in hot:  # embedded once: later calls of these texts are cache hits
                await stub.Classify(request)
            servers[name] = (stub, child.pid)
        figures: dict[str, list[float]] = {name: [] for name in servers}
        for i in range(args.rounds):
            names = list(servers) if i % 2 == 0 else list(reversed(servers))
            for name in names:
                stub, pid = servers[name]
                if args.hits:
                    ms = (await cpu_ms_per_call(stub, pid, hot, 64, 4.0))[0]
                else:
                    ms = await new_texts_ms(stub, pid, f"r{i}")
                figures[name].append(ms)
            rounds = ", ".join(f"{name} {values[-1]:.3f}" for name, values in figures.items())
            print(f"round {i + 1}: {rounds}; load average {os.getloadavg()[0]:.1f}")
    kind = "cache hits" if args.hits else "new texts"
    print(f"bench/cpu_ab.py --rounds {args.rounds}: CPU per Classify ({kind}, c=64), ms")
    for name, values in figures.items():
        each = ", ".join(f"{v:.3f}" for v in values)
        print(f"  {name}: median {statistics.median(values):.3f} (rounds: {each})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--other", required=True, help="the checkout to compare with")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--hits", action="store_true", help="classify cached texts only")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
