"""Concurrent Classify calls share embedding calls and store queries; a full queue and late
requests are refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knn_classifier.client import (
    AsyncClient,
    InvalidArgumentError,
    KnnClassifierError,
    Prediction,
)
from knn_classifier.server import deadlines
from knn_classifier.server.coalescing import Coalescer, QueryBatcher
from knn_classifier.server.errors import DeadlineExceeded, InvalidArgument, Unavailable
from knn_classifier.server.store import EdgeStore
from knn_classifier.server.store.schema import read_payload

from .conftest import ServerThread, make_settings, wait_for
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
    fake_embedder.reset()
    gate = fake_embedder.hold()

    async def scenario() -> list[object]:
        async with AsyncClient(running.address, timeout=30) as client:
            first = asyncio.ensure_future(client.classify("c", "red first"))
            await asyncio.to_thread(fake_embedder.wait_for_held, 1)  # holds the only slot
            others = [asyncio.ensure_future(client.classify("c", f"red {i}")) for i in range(20)]

            # Queued texts wait for the gate, so the first 16 to finish are the refusals: then
            # every text has reached the server while the slot was held (after one refusal only,
            # a late text could still arrive once the gate opened and be served).
            finished = asyncio.as_completed(others, timeout=60)
            for _ in range(16):
                with contextlib.suppress(KnnClassifierError):
                    await next(finished)
            gate.set()
            return await asyncio.gather(first, *others, return_exceptions=True)

    try:
        answers = asyncio.run(scenario())
        refused = [a for a in answers if isinstance(a, KnnClassifierError)]
        served = [a for a in answers if not isinstance(a, Exception)]
        assert {e.code.name for e in refused} == {"RESOURCE_EXHAUSTED"}
        assert "the embedding queue is full" in refused[0].details
        assert (len(served), len(refused)) == (1 + 4, 16)  # the first, and the 4 texts queued
    finally:
        gate.set()
        running.stop()


def test_requests_that_expire_in_the_queue_are_not_sent(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    running = serve(tmp_path, fake_embedder.base_url)
    fake_embedder.reset()
    gate = fake_embedder.hold()
    try:

        async def scenario() -> list[object]:
            async with AsyncClient(running.address, timeout=30) as client:
                first = asyncio.ensure_future(client.classify("c", "slow first"))
                await asyncio.to_thread(fake_embedder.wait_for_held, 1)  # holds the only slot
                late = [client.classify("c", f"late {i}", timeout=0.3) for i in range(5)]
                answers = await asyncio.gather(*late, return_exceptions=True)
                gate.set()
                # Queued after the late ones: once it is answered, they were sent or dropped.
                after = await client.classify("c", "after")
                return [await first, *answers, after]

        answers = asyncio.run(scenario())
        assert {type(a).__name__ for a in answers[1:-1]} == {"DeadlineExceededError"}
        sent = [text for call in fake_embedder.behaviour.inputs for text in call]
        assert sent == ["slow first", "after"]
    finally:
        gate.set()
        running.stop()


def share_one_call(
    running: ServerThread,
    fake_embedder: FakeEmbeddingServer,
    calls: Sequence[Callable[[AsyncClient], Awaitable[object]]],
    texts: int,
) -> list[object]:
    """Makes ``calls`` (of ``texts`` texts in all) share one embedding call, deterministically.

    A first Classify holds the server's only embedding slot at the fake embedder until the
    others are all queued; then all of them are sent together. Returns their answers.
    """
    assert running.app is not None
    coalescer = running.app.service._embedder.coalescer
    assert coalescer is not None
    gate = fake_embedder.hold()

    async def scenario() -> list[object]:
        async with AsyncClient(running.address, timeout=30) as client:
            first = asyncio.ensure_future(client.classify("c", "green pear"))
            await asyncio.to_thread(fake_embedder.wait_for_held, 1)
            together = asyncio.gather(*(call(client) for call in calls), return_exceptions=True)
            await asyncio.to_thread(
                wait_for, lambda: coalescer.queued_texts == texts, "every request to be queued"
            )
            gate.set()
            assert (await first).label == "fruit"
            return list(await together)

    try:
        return asyncio.run(scenario())
    finally:
        gate.set()


def test_a_text_the_model_rejects_fails_only_its_own_caller(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Two Classify calls share one embedding call and the model rejects one's text (HTTP 400):
    each is sent again alone, so the other is classified and the rejection describes only the
    rejected text."""
    running = serve(tmp_path, fake_embedder.base_url)
    try:
        behaviour = fake_embedder.reset(max_input_chars=40)
        good, bad = "red fruit basket", "blue car on a long and winding road " * 3
        classified, rejected = share_one_call(
            running,
            fake_embedder,
            [lambda client: client.classify("c", good), lambda client: client.classify("c", bad)],
            texts=2,
        )
    finally:
        running.stop()
    assert classified.label == "fruit"  # type: ignore[attr-defined]
    assert isinstance(rejected, KnnClassifierError)
    assert rejected.code.name == "INVALID_ARGUMENT"
    assert f"The input ({len(bad)} tokens) is longer" in rejected.details
    assert str(len(good)) not in rejected.details
    calls = behaviour.inputs
    assert calls[0] == ["green pear"]
    assert sorted(calls[1]) == sorted([good, bad])  # the shared call, rejected
    assert sorted(calls[2:]) == sorted([[good], [bad]])  # each sent once more, alone


def test_an_unusable_vector_fails_only_the_caller_whose_text_got_it(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Three Classify calls share one embedding call and the server answers an all-zero vector
    for one caller's text: that caller alone is UNAVAILABLE, and the others are classified from
    the same call."""
    running = serve(tmp_path, fake_embedder.base_url)
    try:
        behaviour = fake_embedder.reset(zero_texts={"broken text"})
        fruit, broken, batch = share_one_call(
            running,
            fake_embedder,
            [
                lambda client: client.classify("c", "red fruit basket"),
                lambda client: client.classify("c", "broken text"),
                lambda client: client.classify_batch("c", ["blue car road", "green pear"]),
            ],
            texts=4,
        )
    finally:
        running.stop()
    assert fruit.label == "fruit"  # type: ignore[attr-defined]
    assert isinstance(broken, KnnClassifierError)
    assert broken.code.name == "UNAVAILABLE"
    assert "all-zero or non-finite" in broken.details
    assert [answer.label for answer in batch] == ["car", "fruit"]  # type: ignore[attr-defined]
    shared = ["blue car road", "broken text", "green pear", "red fruit basket"]
    assert sorted(behaviour.inputs[1]) == shared
    # After it, only the client's own retries of the failed Classify.
    assert all(call == ["broken text"] for call in behaviour.inputs[2:])


def test_a_write_larger_than_the_embedding_queue_is_not_refused(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Writes embed on the bulk path, beside the coalescer: its bounded queue is for Classify."""
    running = serve(tmp_path, fake_embedder.base_url, max_queued_texts=4)
    try:
        with running.client() as client:
            client.add_exemplars("c", [(f"yellow banana {i}", "fruit") for i in range(10)])
            assert client.get_classifier("c").exemplar_count == 13
    finally:
        running.stop()


def test_a_rejected_batch_in_a_shared_call_is_split_once_more_and_no_further(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """The coalescer resends each request alone; the service then splits the rejected batch
    into single texts: each text is sent at most three times, and only the bad one fails."""
    running = serve(tmp_path, fake_embedder.base_url)
    try:
        behaviour = fake_embedder.reset(max_input_chars=40)
        good, fine, bad = "red fruit basket", "blue car road", "green pear fruit " * 5
        classified, batch = share_one_call(
            running,
            fake_embedder,
            [
                lambda client: client.classify("c", good),
                lambda client: client.classify_batch("c", [fine, bad]),
            ],
            texts=3,
        )
    finally:
        running.stop()
    assert isinstance(classified, Prediction)
    assert classified.label == "fruit"
    assert isinstance(batch, list)
    fine_answer, bad_answer = batch
    assert fine_answer.label == "car"
    assert isinstance(bad_answer, InvalidArgumentError)
    assert bad_answer.reason == "INPUT_REJECTED_BY_MODEL"
    assert f"The input ({len(bad)} tokens) is longer" in bad_answer.details
    calls = behaviour.inputs
    assert sorted(calls[1]) == sorted([good, fine, bad])  # shared, rejected
    assert sorted(calls[2:4]) == sorted([[good], [fine, bad]])  # each request alone
    assert calls[4:] == [[fine], [bad]]  # the rejected batch, one text per call


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


class RecordingEmbed:
    """An embedding function that records its calls and answers after ``delay_s``."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.calls: list[list[str]] = []
        self.called = asyncio.Event()
        self.delay_s = delay_s

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.called.set()
        await asyncio.sleep(self.delay_s)
        return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)


async def test_an_idle_service_sends_at_once_however_long_the_wait_setting() -> None:
    embed = RecordingEmbed()
    coalescer = Coalescer(embed, 256, 4, 1000, max_wait_s=30.0)
    try:
        for text in ["a", "bb", "ccc"]:  # one after another: never busy
            rows = await asyncio.wait_for(coalescer.embed([text]), timeout=10)
            assert rows.tolist() == [[float(len(text)), 1.0]]
    finally:
        await coalescer.close()
    assert embed.calls == [["a"], ["bb"], ["ccc"]]


async def test_a_busy_service_gathers_requests_and_sends_a_repeated_text_once() -> None:
    embed = RecordingEmbed(delay_s=0.05)
    coalescer = Coalescer(embed, 256, 4, 1000, max_wait_s=0.2)
    try:
        first = asyncio.ensure_future(coalescer.embed(["first"]))
        await embed.called.wait()  # the first call is in flight: the service is busy
        texts = ["x", "yy", "x", "zzz", "yy"]
        rows = await asyncio.gather(*(coalescer.embed([t]) for t in texts))
        await first
    finally:
        await coalescer.close()
    assert embed.calls == [["first"], ["x", "yy", "zzz"]]
    assert [r.tolist() for r in rows] == [[[float(len(t)), 1.0]] for t in texts]


class RejectingEmbed:
    """Rejects a call holding a text that starts with "bad", naming every text of the call (as
    SGLang's reason names the text it rejects); holds the first call until ``release`` is set."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.in_flight = 0
        self.most_in_flight = 0
        self.first_started = asyncio.Event()
        self.release = asyncio.Event()

    async def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.calls.append(list(texts))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if len(self.calls) == 1:
                self.first_started.set()
                await self.release.wait()
            await asyncio.sleep(0)  # let concurrent calls overlap
            if any(t.startswith("bad") for t in texts):
                raise InvalidArgument(f"the model rejected the call {list(texts)}")
            return np.array([[float(len(t)), 1.0] for t in texts], dtype=np.float32)
        finally:
            self.in_flight -= 1


async def test_a_rejected_shared_call_is_sent_again_one_request_per_call_within_the_bound() -> None:
    embed = RejectingEmbed()
    coalescer = Coalescer(embed, 256, 2, 1000, max_wait_s=0.0)
    try:
        first = asyncio.ensure_future(coalescer.embed(["first"]))
        await embed.first_started.wait()  # the first call holds one of the two slots
        answers = await asyncio.wait_for(
            asyncio.gather(
                coalescer.embed(["good", "fine"]),
                coalescer.embed(["bad"]),
                coalescer.embed(["good"]),
                return_exceptions=True,
            ),
            timeout=30,
        )
        embed.release.set()
        await first
    finally:
        await coalescer.close()
    assert embed.calls == [
        ["first"],
        ["good", "fine", "bad"],  # shared (a repeated text once) and rejected
        ["good", "fine"],
        ["bad"],
        ["good"],
    ]
    assert embed.most_in_flight == 2
    good_fine, rejected, good = answers
    assert good_fine.tolist() == [[4.0, 1.0], [4.0, 1.0]]  # type: ignore[union-attr]
    assert good.tolist() == [[4.0, 1.0]]  # type: ignore[union-attr]
    assert isinstance(rejected, InvalidArgument)
    assert str(rejected) == "the model rejected the call ['bad']"


async def test_a_rejected_call_of_one_request_is_not_sent_again() -> None:
    embed = RejectingEmbed()
    embed.release.set()
    coalescer = Coalescer(embed, 256, 2, 1000, max_wait_s=0.0)
    try:
        with pytest.raises(InvalidArgument):
            await asyncio.wait_for(coalescer.embed(["good", "bad"]), timeout=30)
    finally:
        await coalescer.close()
    assert embed.calls == [["good", "bad"]]


async def test_a_request_whose_deadline_passed_in_a_rejected_call_is_not_sent_again() -> None:
    embed = RejectingEmbed()
    coalescer = Coalescer(embed, 256, 2, 1000, max_wait_s=0.0)
    try:
        with deadlines.within(0.05):
            hasty = asyncio.ensure_future(coalescer.embed(["bad hasty"]))
            hasty_deadline = time.monotonic() + (deadlines.remaining() or 0.0)
        patient = asyncio.ensure_future(coalescer.embed(["patient"]))
        await embed.first_started.wait()  # both are in the first call
        await asyncio.sleep(hasty_deadline - time.monotonic() + 0.01)
        assert time.monotonic() > hasty_deadline  # the hasty request's deadline has passed
        embed.release.set()
        answers = await asyncio.wait_for(
            asyncio.gather(hasty, patient, return_exceptions=True), timeout=30
        )
    finally:
        await coalescer.close()
    assert embed.calls == [["bad hasty", "patient"], ["patient"]]
    assert isinstance(answers[0], DeadlineExceeded)
    assert answers[1].tolist() == [[7.0, 1.0]]  # type: ignore[union-attr]


async def test_queries_made_together_become_one_store_query_cut_to_each_k(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    await store.open([2])
    calls: list[int] = []
    query = store.query

    async def counting(
        dimension: int, classifier: str, vectors: np.ndarray, k: int, out_of_scope: Any = None
    ) -> Any:
        calls.append(len(vectors))
        return await query(dimension, classifier, vectors, k, out_of_scope)

    try:
        points = [str(uuid.uuid4()) for _ in range(3)]
        payloads = [
            read_payload({"classifier": "c", "id": p, "label": "l", "text": p}) for p in points
        ]
        await store.upsert(2, points, np.array([[1, 0], [0.8, 0.6], [0, 1]], np.float32), payloads)
        store.query = counting  # type: ignore[method-assign]
        batcher = QueryBatcher(store)
        east, north = np.array([[1, 0]], np.float32), np.array([[0, 1]], np.float32)
        answers = await asyncio.gather(
            batcher.query(2, "c", east, 1),
            batcher.query(2, "c", north, 3),
            batcher.query(2, "c", np.vstack([east, north]), 2),
        )
    finally:
        await store.close()
    assert calls == [4]
    assert [[[h.id for h in hits] for hits in answer] for answer in answers] == [
        [[points[0]]],
        [[points[2], points[1], points[0]]],
        [[points[0], points[1]], [points[2], points[1]]],
    ]


async def test_a_failed_batched_query_fails_each_caller(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    await store.open([2])
    try:

        async def broken(*args: object) -> Any:
            raise Unavailable("store down")

        store.query = broken  # type: ignore[method-assign,assignment]
        batcher = QueryBatcher(store)
        vector = np.array([[1, 0]], np.float32)
        answers = await asyncio.gather(
            batcher.query(2, "c", vector, 1),
            batcher.query(2, "c", vector, 1),
            return_exceptions=True,
        )
    finally:
        await store.close()
    assert [type(a) for a in answers] == [Unavailable, Unavailable]
