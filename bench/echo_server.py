"""The bare baseline: a grpc.aio server that answers Classify with a fixed, real response.

    python -m bench.echo_server --port 50061 --reply reply.bin

It serves ``knn_classifier.v1.ClassifierService/Classify`` with a generic handler that does no
work: it returns the bytes of ``--reply`` (a ClassifyResponse captured from the real service),
so the client sends and receives exactly the messages it does against the service. What it
sustains is what gRPC in Python costs on this machine; the service cannot do better.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc

METHOD = "Classify"
SERVICE = "knn_classifier.v1.ClassifierService"


async def serve(port: int, reply: bytes) -> None:
    async def classify(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        return reply

    handler = grpc.method_handlers_generic_handler(
        SERVICE, {METHOD: grpc.unary_unary_rpc_method_handler(classify)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", type=Path, required=True)
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.reply.read_bytes()))


if __name__ == "__main__":
    main()
