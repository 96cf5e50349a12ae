"""CPU time per unary Classify at concurrency 64, the service against the bare echo server.

    python bench/cpu_per_classify.py                  # 1k exemplars, dimension 1024, 3 rounds
    python bench/cpu_per_classify.py --rounds 5 --seconds 5

Same processes and requests as ``bench/throughput.py`` (the service with the zero-cost embedder,
the echo server answering a captured Classify response). Throughput on a shared machine moves
with the other load; the CPU time each server process spends per answered call (user + system,
all its threads, from /proc) moves far less, and ``echo CPU / service CPU`` is the share of
echo's throughput the service can reach on the same core. The lowest round of each is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.harness import free_port
from bench.throughput import (
    WIDTH,
    classify_request,
    closed_loop,
    grpc_ready,
    http_ok,
    load_exemplars,
    process,
    service,
)
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def child_running(module: str) -> int:
    """The pid of this process's child running ``python -m module``."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            command = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if parent == os.getpid() and module.encode() in command:
            return int(stat.parent.name)
    raise RuntimeError(f"no child runs {module}")


async def cpu_ms_per_call(
    stub: pb_grpc.ClassifierServiceAsyncStub, pid: int, tag: str, seconds: float
) -> float:
    before = cpu_s(pid)
    run = await closed_loop(
        lambda w, n: stub.Classify(classify_request(1024, tag, w, n)), 64, seconds
    )
    return (cpu_s(pid) - before) / len(run.latencies) * 1000


async def measure(args: argparse.Namespace) -> None:
    port = free_port()
    embedder_url = f"http://127.0.0.1:{port}/v1"
    zero = ["-m", "bench.zero_embedder", "--port", str(port), "--width", str(WIDTH)]
    best = {"service": float("inf"), "echo": float("inf")}
    with (
        process(zero, lambda: http_ok(embedder_url.removesuffix("/v1") + "/health")),
        tempfile.TemporaryDirectory(prefix="knn-bench-") as directory,
        service(embedder_url, Path(directory), [1024]) as address,
    ):
        server_pid = child_running("knn_classifier.server")
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.ClassifierServiceStub(channel)
            await load_exemplars(stub, args.size)
            reply = (await stub.Classify(classify_request(1024, "reply", 0, 0))).SerializeToString()
            with tempfile.NamedTemporaryFile(suffix=".bin") as file:
                file.write(reply)
                file.flush()
                echo_port = free_port()
                echo_address = f"127.0.0.1:{echo_port}"
                echo = ["-m", "bench.echo_server", "--port", str(echo_port), "--reply", file.name]
                with process(echo, lambda: grpc_ready(echo_address)):
                    echo_pid = child_running("bench.echo_server")
                    async with grpc.aio.insecure_channel(echo_address) as echo_channel:
                        echo_stub = pb_grpc.ClassifierServiceStub(echo_channel)
                        for i in range(args.rounds):
                            served = await cpu_ms_per_call(stub, server_pid, f"r{i}", args.seconds)
                            echoed = await cpu_ms_per_call(
                                echo_stub, echo_pid, "echo", args.seconds
                            )
                            best["service"] = min(best["service"], served)
                            best["echo"] = min(best["echo"], echoed)
    print(f"bench/cpu_per_classify.py --size {args.size} --rounds {args.rounds}")
    print(
        f"unary Classify c=64, CPU per call: service {best['service']:.3f} ms, echo "
        f"{best['echo']:.3f} ms; the service can reach {best['echo'] / best['service']:.0%} of echo"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=int, default=1000, help="total exemplars")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each measure")
    asyncio.run(measure(parser.parse_args()))


if __name__ == "__main__":
    main()
