"""The bare baseline: a grpc.aio server that answers Classify with a fixed, real response.

    python -m bench.echo_server --port 50061 --reply reply.bin
    python -m bench.echo_server --port 50061 --reply reply.bin --servicer --steps

It serves ``knn_classifier.v1.ClassifierService/Classify`` with a generic handler that does no
work: it returns the bytes of ``--reply`` (a ClassifyResponse captured from the real service),
so the client sends and receives exactly the messages it does against the service. What it
sustains is what gRPC in Python costs on this machine; the service cannot do better.

Two steps towards the service, to tell what each adds: ``--servicer`` answers through the
method's protobuf (de)serialisers, as the generated registration does (the request parsed, the
reply serialised), and ``--steps`` adds the service's own call steps, registered as the service
registers its methods (``app.call_steps`` with default settings: metrics, the access log below
its level as in the benchmarks, admission, the start-up gate opened, parsing).

``--busy-us N`` makes the handler spend N microseconds of CPU before it answers, standing in for
the service's own work: what gRPC's machinery costs per call when the handler is not instant.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import grpc

METHOD = "Classify"
SERVICE = "knn_classifier.v1.ClassifierService"


async def serve(port: int, reply: bytes, servicer: bool, steps: bool, busy_s: float) -> None:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(_answer(reply, busy_s))
    if servicer:
        from knn_classifier.v1 import classifier_pb2 as pb

        handler = grpc.unary_unary_rpc_method_handler(
            _answer(pb.ClassifyResponse.FromString(reply), busy_s),
            request_deserializer=pb.ClassifyRequest.FromString,
            response_serializer=pb.ClassifyResponse.SerializeToString,
        )
    if steps:
        from knn_classifier.server.app import SERVICE_NAME, call_steps
        from knn_classifier.server.interception import Registration
        from knn_classifier.server.metrics import Metrics
        from knn_classifier.server.settings import Settings
        from knn_classifier.server.startup import StartingGate

        gate = StartingGate(SERVICE_NAME)
        gate.open()
        registration = Registration(server, call_steps(Settings(), Metrics(), None, gate))
        registration.add_registered_method_handlers(SERVICE, {METHOD: handler})
    else:
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(SERVICE, {METHOD: handler})]
        )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def _answer(reply: Any, busy_s: float) -> Any:
    async def classify(request: Any, context: Any) -> Any:
        if busy_s:
            until = time.thread_time() + busy_s
            while time.thread_time() < until:
                pass
        return reply

    return classify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", type=Path, required=True)
    parser.add_argument("--servicer", action="store_true", help="parse and build the messages")
    parser.add_argument("--steps", action="store_true", help="the service's call steps")
    parser.add_argument("--busy-us", type=float, default=0, help="handler CPU per call")
    args = parser.parse_args()
    reply = args.reply.read_bytes()
    asyncio.run(serve(args.port, reply, args.servicer, args.steps, args.busy_us / 1e6))


if __name__ == "__main__":
    main()
