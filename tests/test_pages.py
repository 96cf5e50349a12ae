"""Responses that fit: paged lists under the byte budget, page tokens bound to their request, and
classify responses refused before they are built when they would not fit (issue 11, defect 11)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from knn_classifier.client import (
    Client,
    ExemplarInput,
    InvalidArgumentError,
    ResourceExhaustedError,
)
from knn_classifier.server import paging, wire_size
from knn_classifier.server.calibration import Calibration
from knn_classifier.server.domain import ClassifierConfig, ClassifierInfo, Exemplar
from knn_classifier.server.errors import ResourceExhausted
from knn_classifier.server.out_of_scope import OutOfScopeFit
from knn_classifier.server.voting import Neighbour, Vote, Voting
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

BUDGET = 16 * 1024


def raw(server: ServerThread, method: str, request: object) -> object:
    """One call through the generated stub, where the client would walk every page."""
    with server.channel() as channel:
        return getattr(pb_grpc.ClassifierServiceStub(channel), method)(request, timeout=30)


@pytest.fixture
def small_budget(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[Client]:
    """A server whose responses must stay under 16 KiB, with long texts allowed."""
    fake_embedder.behaviour.max_input_chars = 10_000
    settings = make_settings(
        tmp_path, fake_embedder.base_url, limits={"max_response_bytes": BUDGET, "max_page_size": 50}
    )
    running = ServerThread(settings).start()
    with running.client() as client:
        yield client
    running.stop()


def test_list_classifiers_pages_by_name(client: Client, server: ServerThread) -> None:
    names = [f"c{i:02d}" for i in range(7)]
    for name in reversed(names):
        client.create_classifier(name)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        request = pb.ListClassifiersRequest(page_size=3, page_token=token)
        response = raw(server, "ListClassifiers", request)
        assert isinstance(response, pb.ListClassifiersResponse)
        seen.extend(c.name for c in response.classifiers)
        pages += 1
        token = response.next_page_token
        if not token:
            break
    assert (seen, pages) == (names, 3)
    assert [c.name for c in client.list_classifiers()] == names


def test_a_page_holds_fewer_items_when_they_would_not_fit(small_budget: Client) -> None:
    client = small_budget
    client.create_classifier("long")
    client.add_exemplars("long", [(f"{i} " + "x" * 3000, "a") for i in range(12)])
    first = client.list_exemplars("long", page_size=50)
    # Four 3 KB texts fit in 16 KiB (less the envelope), not five.
    assert len(first.exemplars) == 4
    assert first.next_page_token
    texts = [e.text for e in client.iter_exemplars("long")]
    assert sorted(texts) == sorted(f"{i} " + "x" * 3000 for i in range(12))


def test_classifier_and_label_pages_stay_under_the_budget(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """The two other lists are held to the budget too: 2 KB instructions, 250-character labels."""
    settings = make_settings(
        tmp_path,
        fake_embedder.base_url,
        limits={"max_response_bytes": BUDGET, "max_page_size": 200},
    )
    running = ServerThread(settings).start()
    with running.client() as client:
        names = [f"c{i:02d}" for i in range(12)]
        for name in names:
            client.create_classifier(name, instruction=f"{name} " + "i" * 2000)
        client.add_exemplars("c00", [(f"text {i}", f"{i:02d}" + "l" * 248) for i in range(80)])
        classifiers = raw(running, "ListClassifiers", pb.ListClassifiersRequest(page_size=200))
        labels = raw(running, "ListLabels", pb.ListLabelsRequest(classifier="c00", page_size=200))
        assert isinstance(classifiers, pb.ListClassifiersResponse)
        assert isinstance(labels, pb.ListLabelsResponse)
        # 12 classifiers of about 2 KB and 80 labels of about 260 bytes pass 16 KiB.
        for page, items, total in (
            (classifiers, classifiers.classifiers, 12),
            (labels, labels.labels, 80),
        ):
            assert page.ByteSize() <= BUDGET
            assert 0 < len(items) < total
            assert page.next_page_token
        assert [c.name for c in client.list_classifiers()] == names
        assert len(client.list_labels("c00")) == 80
    running.stop()


def test_one_item_that_cannot_fit_is_an_error_that_says_why(small_budget: Client) -> None:
    client = small_budget
    client.create_classifier("huge")
    item = ExemplarInput(
        text="y" * 8000, label="a", metadata={f"k{i}": "v" * 1000 for i in range(10)}
    )
    client.add_exemplars("huge", [item])
    with pytest.raises(ResourceExhaustedError, match="one exemplar takes about") as caught:
        client.list_exemplars("huge")
    error = caught.value
    assert error.reason == "RESPONSE_TOO_LARGE"
    assert error.metadata["limitBytes"] == str(BUDGET)
    assert int(error.metadata["estimatedBytes"]) > BUDGET
    assert not error.retryable


def test_page_size_above_the_limit_is_reduced_to_it(small_budget: Client) -> None:
    client = small_budget
    client.create_classifier("many")
    client.add_exemplars("many", [(f"text {i}", "a") for i in range(60)])
    assert len(client.list_exemplars("many", page_size=1000).exemplars) == 50


@pytest.mark.parametrize(
    ("other", "why"),
    [
        ({"classifier": "second"}, "another classifier"),
        ({"label": "b"}, "another label"),
    ],
)
def test_a_page_token_only_works_for_its_own_request(
    client: Client, server: ServerThread, other: dict[str, str], why: str
) -> None:
    for name in ("first", "second"):
        client.create_classifier(name)
        client.add_exemplars(name, [(f"{name} {i}", "ab"[i % 2]) for i in range(6)])
    token = client.list_exemplars("first", page_size=2).next_page_token
    assert token
    request = {"classifier": "first", **other}
    with pytest.raises(InvalidArgumentError, match="issued for another request") as caught:
        client.list_exemplars(
            request["classifier"], label=request.get("label", ""), page_token=token
        )
    assert caught.value.reason == "INVALID_PAGE_TOKEN"
    assert [v.field for v in caught.value.field_violations] == ["page_token"]
    # And tokens of one list are not tokens of another.
    with pytest.raises(grpc.RpcError, match="issued for another request"):
        raw(server, "ListLabels", pb.ListLabelsRequest(classifier="first", page_token=token))


def test_list_labels_pages_most_exemplars_first(client: Client, server: ServerThread) -> None:
    client.create_classifier("labels")
    counts = {"a": 5, "b": 4, "c": 4, "d": 2, "e": 1}
    client.add_exemplars(
        "labels", [(f"{label} {i}", label) for label, n in counts.items() for i in range(n)]
    )
    first = raw(server, "ListLabels", pb.ListLabelsRequest(classifier="labels", page_size=2))
    assert isinstance(first, pb.ListLabelsResponse)
    request = pb.ListLabelsRequest(
        classifier="labels", page_size=2, page_token=first.next_page_token
    )
    second = raw(server, "ListLabels", request)
    assert isinstance(second, pb.ListLabelsResponse)
    assert [(c.label, c.count) for c in [*first.labels, *second.labels]] == [
        ("a", 5),
        ("b", 4),
        ("c", 4),
        ("d", 2),
    ]
    assert client.list_labels("labels") == counts


def test_list_pages_carry_the_etag_they_were_read_at(client: Client, server: ServerThread) -> None:
    client.create_classifier("tagged")
    client.add_exemplars(
        "tagged", [("red apple", "fruit"), ("green pear", "fruit"), ("kale", "veg"), ("nut", "nut")]
    )

    def etags() -> tuple[str, str]:
        labels = raw(server, "ListLabels", pb.ListLabelsRequest(classifier="tagged", page_size=1))
        assert isinstance(labels, pb.ListLabelsResponse)
        assert labels.next_page_token
        assert client.list_labels("tagged").etag == labels.etag  # the client's dict carries it
        return client.list_exemplars("tagged", page_size=1).etag, labels.etag

    before = client.get_classifier("tagged").etag
    assert etags() == (before, before)
    added = client.add_exemplars("tagged", [("plum", "fruit")], etag=before)
    assert added.etag != before
    assert etags() == (added.etag, added.etag)
    deleted = client.delete_exemplars("tagged", label="veg", etag=etags()[0])  # it is current
    assert deleted.etag != added.etag
    assert etags() == (deleted.etag, deleted.etag) == (client.get_classifier("tagged").etag,) * 2


@pytest.mark.parametrize(
    ("method", "scope", "cursor"),
    [
        ("ListExemplars", ("ListExemplars", "cursors", ""), "not-a-point-id"),
        ("ListLabels", ("ListLabels", "cursors"), "many:a"),
    ],
)
def test_a_token_of_this_scope_with_a_malformed_position_is_refused(
    client: Client, server: ServerThread, method: str, scope: tuple[str, ...], cursor: str
) -> None:
    """A token whose envelope is ours and whose scope matches, but whose position is not one
    the list ever issues, is INVALID_PAGE_TOKEN (not a store error or INTERNAL)."""
    client.create_classifier("cursors")
    client.add_exemplars("cursors", [("one", "a"), ("two", "b")])
    request = getattr(pb, f"{method}Request")(
        classifier="cursors", page_token=paging.encode(cursor, scope)
    )
    with pytest.raises(grpc.RpcError) as caught:
        raw(server, method, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not one this server issued" in str(caught.value.details())


def test_a_label_cursor_reads_back_as_its_position_even_with_colons_in_the_label() -> None:
    assert paging.label_position(paging.label_cursor(4, "a:b")) == (-4, "a:b")
    assert paging.point_offset(None) is None
    assert paging.label_position(None) is None


# Issue 11, defect 11: a ClassifyBatch with neighbours over long exemplars built a 364 MB
# response before gRPC's send limit refused it. Now it is refused before anything is built.


@pytest.fixture
def long_exemplars(client: Client, fake_embedder: FakeEmbeddingServer) -> Client:
    """200 exemplars of 8,000 characters: 1.6 MB of neighbour text for one text at k=200."""
    fake_embedder.behaviour.max_input_chars = 10_000
    client.create_classifier("long")
    client.add_exemplars("long", [(f"{i:03d} " + "z" * 7996, "ab"[i % 2]) for i in range(200)])
    return client


def test_a_classify_batch_too_large_to_receive_is_refused_before_it_is_built(
    long_exemplars: Client,
) -> None:
    client = long_exemplars
    texts = [f"query {i}" for i in range(16)]
    # 16 texts x 200 neighbours x 8 KB: 26 MB, over the default budget (4 MiB less 64 KiB)
    # and under the old 32 MiB send limit, so the old server built and sent it.
    with pytest.raises(ResourceExhaustedError, match="no neighbours") as caught:
        client.classify_batch("long", texts, k=200, include_neighbours=True)
    error = caught.value
    assert error.reason == "RESPONSE_TOO_LARGE"
    assert error.metadata["limitBytes"] == str(4 * 1024 * 1024 - 64 * 1024)
    assert int(error.metadata["estimatedBytes"]) > 4 * 1024 * 1024 - 64 * 1024
    # Without neighbours, or with fewer, the same call fits.
    assert len(client.classify_batch("long", texts, k=200)) == 16
    assert len(client.classify_batch("long", texts[:2], k=200, include_neighbours=True)) == 2


def test_one_classify_too_large_to_receive_is_refused(small_budget: Client) -> None:
    client = small_budget
    client.create_classifier("long")
    client.add_exemplars("long", [(f"{i} " + "x" * 3000, "ab"[i % 2]) for i in range(12)])
    with pytest.raises(ResourceExhaustedError, match="no neighbours") as caught:
        client.classify("long", "x", k=10, min_similarity=-1, include_neighbours=True)
    assert caught.value.reason == "RESPONSE_TOO_LARGE"
    fits = client.classify("long", "x", k=4, min_similarity=-1, include_neighbours=True)
    assert len(fits.neighbours) == 4


def test_the_work_of_one_classify_call_is_capped(client: Client) -> None:
    client.create_classifier("capped")
    client.add_exemplars("capped", [("one text", "a"), ("another text", "b")])
    # 257 texts x k=200 = 51,400 neighbours, over the default 51,200.
    with pytest.raises(InvalidArgumentError, match="51400 neighbours") as caught:
        client.classify_batch("capped", ["text"] * 257, k=200)
    assert caught.value.reason == "TOO_MANY_NEIGHBOURS"
    assert caught.value.metadata == {"limit": "51200", "actual": "51400"}
    assert len(client.classify_batch("capped", ["text"] * 256, k=200)) == 256


# The size bounds behind the budget ------------------------------------------------------------


def _vote(texts: list[str]) -> Vote:
    voters = [Neighbour(f"id-{i}", f"label-{i % 3}", t, 0.5, True) for i, t in enumerate(texts)]
    return Vote("label-0", 0.7, [("label-0", 0.7), ("label-1", 0.3)], voters, 0.9, None)


@pytest.mark.parametrize(
    "texts",
    [["short"], ["ascii " * 300] * 20, ["中文評論很好吃" * 100, "émoji 🙂" * 50, ""]],
    ids=["short", "ascii", "non-ascii"],
)
def test_the_estimates_bound_the_encoded_sizes_closely(texts: list[str]) -> None:
    from knn_classifier.server import messages

    vote = _vote(texts)
    built = pb.ClassifyBatchResponse(
        results=[pb.ClassifyBatchResult(prediction=messages.prediction(vote, True))]
    )
    estimate = wire_size.prediction(vote, include_neighbours=True)
    assert built.ByteSize() <= estimate <= built.ByteSize() + 128 + 24 * len(texts)

    metadata = {"source": texts[-1], "k": "v"}
    exemplar = Exemplar("an-id", texts[0], "label", metadata, 1.7e9, out_of_scope=True)
    message = pb.ListExemplarsResponse(
        exemplars=[
            pb.Exemplar(
                id=exemplar.id,
                text=exemplar.text,
                label=exemplar.label,
                metadata=exemplar.metadata,
                out_of_scope=True,
            )
        ]
    )
    message.exemplars[0].created_at.FromSeconds(int(exemplar.created_at))
    assert message.ByteSize() <= wire_size.exemplar(exemplar) <= message.ByteSize() + 64

    config = ClassifierConfig(texts[0][:64], texts[-1], 10, Voting.SOFTMAX, 0.1, 0.2, 1.7e9, 0.05)
    listed = pb.ListClassifiersResponse(
        classifiers=[messages.classifier(ClassifierInfo(config, 123))]
    )
    listed.classifiers[0].etag = "e" * 64
    assert listed.ByteSize() <= wire_size.classifier(ClassifierInfo(config, 123))

    calibrated = dataclasses.replace(
        config, calibration=Calibration(tuple(np.linspace(0, 1, 64)), tuple([0.5] * 64))
    )
    listed = pb.ListClassifiersResponse(
        classifiers=[messages.classifier(ClassifierInfo(calibrated, 1))]
    )
    assert listed.ByteSize() <= wire_size.classifier(ClassifierInfo(calibrated, 1))

    references = tuple(np.linspace(-1, 1, 256))
    rule = OutOfScopeFit(64, 0.98, -3.5, 0.99, references, references, references, 2**62)
    with_rule = dataclasses.replace(calibrated, out_of_scope=rule)
    listed = pb.ListClassifiersResponse(
        classifiers=[messages.classifier(ClassifierInfo(with_rule, 1))]
    )
    assert listed.ByteSize() <= wire_size.classifier(ClassifierInfo(with_rule, 1))

    vectors = {16: [0.25] * 16, 2560: [-0.5] * 2560}
    with_vectors = pb.Exemplar(
        vectors=[pb.ExemplarVector(dimension=d, values=v) for d, v in vectors.items()]
    )
    assert with_vectors.ByteSize() <= wire_size.vectors(vectors) <= with_vectors.ByteSize() + 64


def test_a_refused_response_is_estimated_above_the_budget() -> None:
    """A part just under the budget but over it with the envelope: the estimate in the error
    counts the envelope too, so it never reads as fitting (it read BUDGET - 1000)."""
    part = BUDGET - 1000
    with pytest.raises(ResourceExhausted) as one_item:
        paging.fitting([part], lambda size: size, BUDGET, "one exemplar")
    with pytest.raises(ResourceExhausted) as response:
        paging.ensure_fits([part], BUDGET, "ask for less")
    for caught in (one_item, response):
        estimated = int(caught.value.metadata["estimatedBytes"])
        assert estimated > BUDGET
        assert str(estimated) in caught.value.message
