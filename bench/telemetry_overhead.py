"""CPU cost per call of the telemetry interceptor, on the cheapest RPC there is.

    python bench/telemetry_overhead.py [--rounds 7] [--calls 2000]

A grpc.aio server in this process answers health Check through the interceptor chain of the
service's telemetry (or none), and a client in the same process calls it sequentially. The
figure is process CPU time per call (client and server), the lowest of the rounds, so that
other load on the machine inflates it as little as possible. Variants: no interceptor; metrics
only (access log below its level); metrics and a text access line; metrics and a JSON access
line; metrics and a span per call (a tracer provider without exporter).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knn_classifier.server.logs import JsonFormatter
from knn_classifier.server.metrics import Metrics
from knn_classifier.server.telemetry import RpcTelemetry

VARIANTS = ("none", "metrics", "access text", "access json", "tracing")


class Healthy(health_pb2_grpc.HealthServicer):
    async def Check(self, request: Any, context: Any) -> Any:  # noqa: N802  (gRPC name)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def set_up(variant: str) -> list[Any]:
    handler = logging.FileHandler("/dev/null")
    if variant == "access json":
        handler.setFormatter(JsonFormatter())
    # Health checks are logged at DEBUG.
    level = "DEBUG" if variant.startswith("access") else "WARNING"
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if variant == "none":
        return []
    telemetry = RpcTelemetry(Metrics(), TracerProvider() if variant == "tracing" else None)
    return [telemetry, telemetry.inner]


async def cpu_per_call(variant: str, calls: int) -> float:
    server = grpc.aio.server(interceptors=set_up(variant))
    health_pb2_grpc.add_HealthServicer_to_server(Healthy(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest()
        for _ in range(200):  # warm up
            await stub.Check(request)
        started = time.process_time()
        for _ in range(calls):
            await stub.Check(request)
        used = time.process_time() - started
    await server.stop(0)
    return used / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    best = dict.fromkeys(VARIANTS, float("inf"))
    for _ in range(args.rounds):
        for variant in VARIANTS:
            best[variant] = min(best[variant], asyncio.run(cpu_per_call(variant, args.calls)))
    print("| variant | CPU per call (us) | added (us) |\n|---|---|---|")
    for variant, seconds in best.items():
        added = (seconds - best["none"]) * 1e6
        print(f"| {variant} | {seconds * 1e6:.0f} | {added:+.0f} |")


if __name__ == "__main__":
    main()
