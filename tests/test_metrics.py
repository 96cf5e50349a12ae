"""Prometheus metrics: real calls through the real server, then a scrape of /metrics over HTTP,
parsed with prometheus_client's own parser."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from knn_classifier.client import (
    Client,
    InvalidArgumentError,
    NotFoundError,
    UnauthenticatedError,
)
from knn_classifier.server.coalescing import Coalescer
from knn_classifier.server.metrics import Metrics

from .conftest import ServerThread, make_settings, predictions, raw_method, wait_for
from .fake_embedder import FakeEmbeddingServer

SERVICE = "knn_classifier.v1.ClassifierService"
EXEMPLARS = [
    ("my card has not arrived yet", "card_arrival"),
    ("when will my new card arrive", "card_arrival"),
    ("I want to top up my account", "top_up"),
    ("how do I top up with a bank transfer", "top_up"),
]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 if it was never recorded (as Prometheus would treat it)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpc(samples: Samples, method: str, code: str, suffix: str = "_total") -> float:
    name = "grpc_server_handled" if suffix == "_total" else "grpc_server_handling_seconds"
    return value(samples, name + suffix, grpc_service=SERVICE, grpc_method=method, grpc_code=code)


def started(data_dir: Path, base_url: str, **overrides: Any) -> ServerThread:
    metrics = {"enabled": True, "port": 0, **overrides.pop("metrics", {})}
    return ServerThread(make_settings(data_dir, base_url, metrics=metrics, **overrides))


@pytest.fixture
def metered(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[ServerThread]:
    server = started(
        tmp_path / "metered", fake_embedder.base_url, limits={"max_text_chars": 100}
    ).start()
    yield server
    server.stop()


def port_of(server: ServerThread) -> int:
    assert server.app is not None
    assert server.app.metrics_port is not None
    return server.app.metrics_port


def test_metrics_are_off_by_default_and_on_loopback_when_enabled(
    server: ServerThread, metered: ServerThread
) -> None:
    assert server.app is not None
    assert server.app.metrics_port is None
    assert metered.app is not None
    assert metered.app._metrics_server is not None
    assert metered.app._metrics_server.address[0] == "127.0.0.1"


def test_rpc_embedding_store_and_prediction_metrics_after_real_calls(
    metered: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    with metered.client() as client:
        client.create_classifier("support", k=3)
        client.add_exemplars("support", EXEMPLARS)
        labelled = client.classify("support", "my card has not arrived")
        unknown = client.classify("support", "zebra quantum", min_similarity=0.99)
        with pytest.raises(NotFoundError):
            client.classify("nope", "my card")
        batch = client.classify_batch("support", ["top up my account", "x" * 101])
    assert labelled.label == "card_arrival"
    assert unknown.unknown
    assert isinstance(batch[1], InvalidArgumentError)

    # An error status reaches the caller as the handler ends; it is counted just after.
    wait_for(lambda: rpc(scrape(port_of(metered)), "Classify", "NOT_FOUND") == 1)
    samples = scrape(port_of(metered))

    assert rpc(samples, "CreateClassifier", "OK") == 1
    assert rpc(samples, "AddExemplars", "OK") == 1
    assert rpc(samples, "Classify", "OK") == 2
    assert rpc(samples, "Classify", "NOT_FOUND") == 1
    assert rpc(samples, "ClassifyBatch", "OK") == 1
    assert rpc(samples, "Classify", "OK", "_count") == 2
    assert rpc(samples, "Classify", "OK", "_sum") > 0

    assert value(samples, "knn_predictions_total", classifier="support", outcome="label") == 2
    assert (
        value(
            samples,
            "knn_predictions_total",
            classifier="support",
            outcome="below_min_similarity",
        )
        == 1
    )
    assert value(samples, "knn_predictions_total", classifier="support", outcome="rejected") == 1
    answered = [labelled, unknown, *predictions(batch[:1])]
    count = value(samples, "knn_prediction_top_similarity_count", classifier="support")
    total = value(samples, "knn_prediction_top_similarity_sum", classifier="support")
    assert count == 3
    assert total == pytest.approx(sum(p.top_similarity for p in answered), abs=1e-5)
    assert value(samples, "knn_prediction_confidence_sum", classifier="support") == pytest.approx(
        sum(p.confidence for p in answered), abs=1e-5
    )
    assert value(samples, "knn_exemplars", classifier="support") == len(EXEMPLARS)

    # The embedder's own count of calls and texts (the start-up probe included).
    received = fake_embedder.behaviour
    assert value(samples, "knn_embedding_calls_total", outcome="ok") == received.calls
    assert value(samples, "knn_embedding_texts_per_call_sum") == sum(map(len, received.inputs))
    # Three Classify requests reached the embedder through the coalescer, one query each.
    assert value(samples, "knn_embedding_requests_per_call_sum") == 3
    assert value(samples, "knn_store_query_seconds_count", dimension="64") == 3
    assert value(samples, "knn_embedding_queued_texts") == 0
    assert ("process_cpu_seconds_total", frozenset()) in samples


def test_retries_and_failed_calls_are_counted_by_reason(
    metered: ServerThread, fake_embedder: FakeEmbeddingServer
) -> None:
    with metered.client() as client:
        client.create_classifier("support")
        fake_embedder.reset(fail_status=503, fail_times=1)
        client.add_exemplars("support", EXEMPLARS)  # one 503, retried, then answered
    samples = scrape(port_of(metered))
    assert value(samples, "knn_embedding_retries_total", reason="HTTP 503") == 1
    assert value(samples, "knn_embedding_calls_total", outcome="http_503") == 1


def test_cache_hits_and_misses_per_layer(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    cached = started(
        tmp_path,
        fake_embedder.base_url,
        embedding={"cache_entries": 100, "cache_file": True},
    ).start()
    try:
        with cached.client() as client:
            client.create_classifier("support")
            client.add_exemplars("support", EXEMPLARS)  # 4 misses in memory and in SQLite
            client.classify("support", EXEMPLARS[0][0])  # a hit in memory
        samples = scrape(port_of(cached))
    finally:
        cached.stop()

    def lookups(layer: str, result: str) -> float:
        return value(samples, "knn_embedding_cache_lookups_total", layer=layer, result=result)

    assert (lookups("memory", "hit"), lookups("memory", "miss")) == (1, 4)
    assert (lookups("sqlite", "hit"), lookups("sqlite", "miss")) == (0, 4)


def test_classifiers_beyond_the_limit_are_folded_into_other(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    folded = started(tmp_path, fake_embedder.base_url, metrics={"max_classifiers": 1}).start()
    try:
        with folded.client() as client:
            for name in ("first", "second", "third"):
                client.create_classifier(name)
                client.add_exemplars(name, EXEMPLARS)
                client.classify(name, "top up")
        samples = scrape(port_of(folded))
    finally:
        folded.stop()
    classifiers = {
        dict(labels)["classifier"] for (name, labels) in samples if name == "knn_predictions_total"
    }
    assert classifiers == {"first", "other"}
    assert value(samples, "knn_predictions_total", classifier="other", outcome="label") == 2
    assert value(samples, "knn_exemplars", classifier="first") == len(EXEMPLARS)
    assert value(samples, "knn_exemplars", classifier="other") == 2 * len(EXEMPLARS)


def test_a_deleted_classifier_loses_its_series_and_frees_its_place(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Deleted classifiers' names do not accumulate: their series go, and a new classifier
    takes the freed place instead of being folded into 'other'."""
    limited = started(tmp_path, fake_embedder.base_url, metrics={"max_classifiers": 1}).start()
    try:
        with limited.client() as client:
            client.create_classifier("old")
            client.add_exemplars("old", EXEMPLARS)
            client.classify("old", "top up")
            client.classify("old", "zebra", min_similarity=0.99)
            before = scrape(port_of(limited))
            client.delete_classifier("old")
            after_delete = scrape(port_of(limited))
            client.create_classifier("new")
            client.add_exemplars("new", EXEMPLARS)
            client.classify("new", "top up")
            after_new = scrape(port_of(limited))
    finally:
        limited.stop()

    def classifiers(samples: Samples) -> set[str]:
        return {dict(labels).get("classifier", "") for (_, labels) in samples} - {""}

    assert value(before, "knn_predictions_total", classifier="old", outcome="label") == 1
    assert value(before, "knn_prediction_confidence_count", classifier="old") == 2
    assert classifiers(before) == {"old"}
    assert classifiers(after_delete) == set()
    assert classifiers(after_new) == {"new"}
    assert value(after_new, "knn_predictions_total", classifier="new", outcome="label") == 1


def test_a_classifier_created_again_after_its_delete_is_counted_again(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """The series the service keeps at hand are dropped with the deleted ones: the next
    classifier of the same name counts into series that a scrape sees."""
    metered = started(tmp_path, fake_embedder.base_url).start()
    try:
        with metered.client() as client:
            for _ in range(2):
                client.create_classifier("again")
                client.add_exemplars("again", EXEMPLARS)
                client.classify("again", "top up")
                samples = scrape(port_of(metered))
                client.delete_classifier("again")
            client.create_classifier("again")
            client.add_exemplars("again", EXEMPLARS)
            client.classify("again", "top up")
            client.classify("again", "top up")
            after = scrape(port_of(metered))
    finally:
        metered.stop()
    assert value(samples, "knn_predictions_total", classifier="again", outcome="label") == 1
    assert value(after, "knn_predictions_total", classifier="again", outcome="label") == 2
    assert value(after, "knn_prediction_confidence_count", classifier="again") == 2
    assert value(after, "knn_prediction_top_similarity_count", classifier="again") == 2


def test_calls_refused_before_the_servicer_are_counted(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    keyed = started(tmp_path, fake_embedder.base_url, auth={"write_keys": "secret"}).start()
    try:
        with Client(keyed.address, api_key="wrong") as client, pytest.raises(UnauthenticatedError):
            client.list_classifiers()
        wait_for(lambda: rpc(scrape(port_of(keyed)), "ListClassifiers", "UNAUTHENTICATED") == 1)
    finally:
        keyed.stop()


def test_invented_method_names_do_not_become_labels(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Auth refuses a call before its method is resolved: any name a caller invents must not
    make a series of its own."""
    keyed = started(tmp_path, fake_embedder.base_url, auth={"write_keys": "secret"}).start()
    try:
        with grpc.insecure_channel(keyed.address) as channel:
            for i in range(20):
                call = raw_method(channel, f"/evil.Service/Method{i}")
                with pytest.raises(grpc.RpcError):
                    call(b"", timeout=30)

        def refused() -> float:
            return handled_as_unknown(keyed, "UNAUTHENTICATED")

        # A call is counted as its handler ends, which may be just after its caller has the
        # status: wait for the last count (bounded), then check nothing else was counted.
        wait_for(lambda: refused() >= 20, "the 20 refusals to be counted")
        samples = scrape(port_of(keyed))
        assert not [key for key in samples if "evil.Service" in str(key)]
        assert refused() == 20
    finally:
        keyed.stop()


def test_unknown_methods_are_unimplemented_and_counted_under_unknown(
    metered: ServerThread,
) -> None:
    """A method no servicer registers is answered through the same call steps as the others:
    UNIMPLEMENTED with a message that says where the methods are listed, and counted."""
    with metered.channel() as channel:
        for i in range(3):
            with pytest.raises(grpc.RpcError) as caught:
                raw_method(channel, f"/knn_classifier.v1.ClassifierService/Invented{i}")(
                    b"", timeout=30
                )
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "reflection lists the methods" in str(caught.value.details())

    def unimplemented() -> float:
        return handled_as_unknown(metered, "UNIMPLEMENTED")

    wait_for(lambda: unimplemented() >= 3, "the 3 calls to be counted")
    assert unimplemented() == 3
    assert not [key for key in scrape(port_of(metered)) if "Invented" in str(key)]


def handled_as_unknown(server: ServerThread, code: str) -> float:
    """How many calls ``server`` counted under the method "unknown" with status ``code``."""
    return value(
        scrape(port_of(server)),
        "grpc_server_handled_total",
        grpc_service="unknown",
        grpc_method="unknown",
        grpc_code=code,
    )


def test_a_busy_metrics_port_stops_start_up_with_a_clear_message(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer, metered: ServerThread
) -> None:
    taken = port_of(metered)
    with pytest.raises(Exception, match=f"cannot serve metrics on 127.0.0.1:{taken}"):
        started(tmp_path / "second", fake_embedder.base_url, metrics={"port": taken}).start()


async def test_queue_depth_and_requests_per_call_of_the_coalescer() -> None:
    metrics = Metrics()
    release = asyncio.Event()
    first_sent = asyncio.Event()

    class Embed:
        async def embed(self, texts: Any) -> Any:
            first_sent.set()
            await release.wait()
            return np.ones((len(texts), 4), dtype=np.float32)

    coalescer = Coalescer(Embed(), 256, 1, 1000, max_wait_s=0.0, metrics=metrics)
    try:
        first = asyncio.create_task(coalescer.embed(["a"]))
        await asyncio.wait_for(first_sent.wait(), 30)
        waiting = [asyncio.create_task(coalescer.embed(["b", "c"])) for _ in range(3)]
        await asyncio.sleep(0)  # let them join the queue
        assert metrics.registry.get_sample_value("knn_embedding_queued_texts") == 6
        release.set()
        await asyncio.wait_for(asyncio.gather(first, *waiting), 30)
    finally:
        await coalescer.close()
    assert metrics.registry.get_sample_value("knn_embedding_queued_texts") == 0
    # One call for the first request, one for the three that waited behind it.
    assert metrics.registry.get_sample_value("knn_embedding_requests_per_call_count") == 2
    assert metrics.registry.get_sample_value("knn_embedding_requests_per_call_sum") == 4


def test_concurrent_scrapes_while_serving(metered: ServerThread) -> None:
    """Scrapes run on their own threads and count exemplars on the server's loop."""
    with metered.client() as client:
        client.create_classifier("support")
        client.add_exemplars("support", EXEMPLARS)
    results: list[float] = []

    def scrape_once() -> None:
        results.append(value(scrape(port_of(metered)), "knn_exemplars", classifier="support"))

    threads = [threading.Thread(target=scrape_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == [len(EXEMPLARS)] * 4
