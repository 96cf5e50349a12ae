"""Probes of this session's merged changes that found defects (third review, 2026-11-30)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from .conftest import ServerThread


def test_a_stream_to_an_unknown_method_sending_nothing_is_answered_unimplemented(
    server: ServerThread,
) -> None:
    """A streaming caller that waits for the server before sending (or sends nothing) gets
    UNIMPLEMENTED at once, as from gRPC itself, not a wait for its deadline: the refusal of
    unknown methods must not wait for a request message. (Timed out before the fix.)"""
    done = threading.Event()

    def nothing_until_done() -> Iterator[bytes]:
        done.wait(timeout=120)
        yield from ()

    try:
        with server.channel() as channel:
            for method in ("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo", "/a.B/C"):
                call = channel.stream_stream(method, None, None)
                with pytest.raises(grpc.RpcError) as caught:
                    next(iter(call(nothing_until_done(), timeout=60)))
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
                assert "reflection lists the methods" in str(caught.value.details())
                empty = channel.stream_unary(method, None, None)
                with pytest.raises(grpc.RpcError) as caught:
                    empty(iter(()), timeout=60)  # half-closes at once, no message
                assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
    finally:
        done.set()
