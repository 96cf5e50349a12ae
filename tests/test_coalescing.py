"""Concurrent Classify calls share embedding calls; a full queue and late requests are refused."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from knn_classifier.client import AsyncClient, KnnClassifierError

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

EXEMPLARS = [("red apple fruit", "fruit"), ("green pear fruit", "fruit"), ("blue car road", "car")]


def serve(tmp_path: Path, base_url: str, **limits: int) -> ServerThread:
    settings = make_settings(
        tmp_path, base_url, embedding={"max_concurrent_calls": 1}, limits=limits
    )
    running = ServerThread(settings).start()
    with running.client() as client:
        client.create_classifier("c")
        client.add_exemplars("c", EXEMPLARS)
    return running


async def classify_all(address: str, texts: list[str]) -> list[object]:
    async with AsyncClient(address, timeout=30) as client:
        calls = [client.classify("c", text) for text in texts]
        return await asyncio.gather(*calls, return_exceptions=True)


def test_64_concurrent_calls_take_at_most_one_embedding_call_per_8(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    running = serve(tmp_path, fake_embedder.base_url)
    try:
        fake_embedder.reset(delay_s=0.05)
        texts = [("red fruit", "blue road")[i % 2] + f" {i}" for i in range(64)]
        answers = asyncio.run(classify_all(running.address, texts))
        assert [a.label for a in answers] == ["fruit", "car"] * 32  # type: ignore[attr-defined]
        calls = fake_embedder.behaviour.calls
        assert 1 <= calls <= 64 // 8, f"{calls} embedding calls for 64 Classify calls"
        sent = [text for call in fake_embedder.behaviour.inputs for text in call]
        assert sorted(sent) == sorted(texts)
    finally:
        running.stop()


def test_a_full_queue_is_refused_at_once(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    running = serve(tmp_path, fake_embedder.base_url, max_queued_texts=4)
    try:
        fake_embedder.reset(delay_s=0.3)
        answers = asyncio.run(classify_all(running.address, [f"red {i}" for i in range(20)]))
        refused = [a for a in answers if isinstance(a, KnnClassifierError)]
        served = [a for a in answers if not isinstance(a, Exception)]
        assert refused
        assert {e.code.name for e in refused} == {"RESOURCE_EXHAUSTED"}
        assert "the embedding queue is full" in refused[0].details
        assert served
    finally:
        running.stop()


def test_requests_that_expire_in_the_queue_are_not_sent(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    running = serve(tmp_path, fake_embedder.base_url)
    try:
        fake_embedder.reset(delay_s=0.6)

        async def scenario() -> list[object]:
            async with AsyncClient(running.address) as client:
                first = asyncio.ensure_future(client.classify("c", "slow first", timeout=5))
                await asyncio.sleep(0.1)  # the first call now holds the only slot
                late = [client.classify("c", f"late {i}", timeout=0.3) for i in range(5)]
                return await asyncio.gather(first, *late, return_exceptions=True)

        answers = asyncio.run(scenario())
        assert not isinstance(answers[0], Exception)
        assert {type(a).__name__ for a in answers[1:]} == {"DeadlineExceededError"}
        asyncio.run(asyncio.sleep(0.8))
        sent = [text for call in fake_embedder.behaviour.inputs for text in call]
        assert sent == ["slow first"]
    finally:
        running.stop()


@pytest.mark.parametrize("failure", [503, 400])
def test_a_failed_call_fails_every_request_in_it(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, failure: int
) -> None:
    running = serve(tmp_path, fake_embedder.base_url)
    try:
        fake_embedder.reset(fail_status=failure, fail_times=100, delay_s=0.05)
        answers = asyncio.run(classify_all(running.address, [f"red {i}" for i in range(10)]))
        expected = "UNAVAILABLE" if failure == 503 else "INVALID_ARGUMENT"
        assert {a.code.name for a in answers} == {expected}  # type: ignore[attr-defined]
    finally:
        running.stop()
