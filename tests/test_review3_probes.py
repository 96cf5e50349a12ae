"""Probes of this session's merged changes that found defects (third review, 2026-11-30)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from .conftest import ServerThread, make_settings, raw_method
from .fake_embedder import FakeEmbeddingServer


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


READ_KEY = "read-key-9876543210"


@pytest.fixture
def read_keyed(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    """A server with API keys on: a write key and the read key READ_KEY."""
    keys = {"write_keys": ["write-key-0123456789"], "read_keys": [READ_KEY]}
    running = ServerThread(make_settings(tmp_path, fake_embedder.base_url, auth=keys)).start()
    yield running
    running.stop()


def test_a_read_key_calling_a_method_that_does_not_exist_is_told_so(
    read_keyed: ServerThread,
) -> None:
    """A read key calling a misspelt read method ("Clasify") or another service gets
    UNIMPLEMENTED, not "needs a write key" (which sent its holder after a key that would get
    UNIMPLEMENTED too); without a key, still UNAUTHENTICATED. (PERMISSION_DENIED before.)"""
    with read_keyed.channel() as channel:
        for method in ("/knn_classifier.v1.ClassifierService/Clasify", "/a.B/C"):
            call = raw_method(channel, method)
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=30, metadata=(("authorization", f"Bearer {READ_KEY}"),))
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED, method
            with pytest.raises(grpc.RpcError) as caught:
                call(b"", timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        write = raw_method(channel, "/knn_classifier.v1.ClassifierService/DeleteClassifier")
        with pytest.raises(grpc.RpcError) as caught:
            write(b"", timeout=30, metadata=(("authorization", f"Bearer {READ_KEY}"),))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
