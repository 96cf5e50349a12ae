"""The real gRPC server in-process, called through the client package, on the fake embedder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from knn_classifier.client import (
    AlreadyExistsError,
    Client,
    ExemplarInput,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
)
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

EXEMPLARS = [
    ("my card has not arrived yet", "card_arrival"),
    ("when will my new card arrive", "card_arrival"),
    ("card still not delivered", "card_arrival"),
    ("I want to top up my account", "top_up"),
    ("how do I top up with a bank transfer", "top_up"),
    ("top up failed twice", "top_up"),
]


@pytest.fixture
def intents(client: Client) -> Client:
    client.create_classifier("intents", k=3, voting="majority")
    client.add_exemplars("intents", EXEMPLARS)
    return client


def health_status(server: ServerThread, service: str = "") -> int:
    with server.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def test_create_get_list_delete_classifier(client: Client) -> None:
    created = client.create_classifier(
        "reviews", instruction="Classify the sentiment", k=7, min_similarity=0.2
    )
    assert created.name == "reviews"
    assert created.k == 7
    assert created.voting == pb.VOTING_SIMILARITY_WEIGHTED  # the server's default
    assert created.min_similarity == pytest.approx(0.2)
    assert created.created_at.seconds > 0
    got = client.get_classifier("reviews")
    assert got.instruction == "Classify the sentiment"
    client.create_classifier("alpha")
    assert [c.name for c in client.list_classifiers()] == ["alpha", "reviews"]
    assert client.delete_classifier("reviews") == 0
    with pytest.raises(NotFoundError, match="reviews"):
        client.get_classifier("reviews")


def test_classify_returns_label_scores_and_neighbours(intents: Client) -> None:
    prediction = intents.classify("intents", "my card has not arrived", include_neighbours=True)
    assert prediction.label == "card_arrival"
    assert not prediction.unknown
    assert prediction.scores[0].label == "card_arrival"
    assert prediction.confidence == pytest.approx(prediction.scores[0].score)
    assert prediction.confidence >= 2 / 3
    assert len(prediction.neighbours) == 3
    nearest = prediction.neighbours[0]
    assert nearest.text == "my card has not arrived yet"
    assert nearest.label == "card_arrival"
    assert nearest.similarity == pytest.approx(prediction.top_similarity)
    sims = [n.similarity for n in prediction.neighbours]
    assert sims == sorted(sims, reverse=True)
    assert not intents.classify("intents", "my card has not arrived").neighbours


def test_per_label_scores_are_best_first_and_sum_to_one(intents: Client) -> None:
    prediction = intents.classify("intents", "top up my card", k=6)
    scores = [s.score for s in prediction.scores]
    assert scores == sorted(scores, reverse=True)
    assert sum(scores) == pytest.approx(1.0)
    assert {s.label for s in prediction.scores} == {"card_arrival", "top_up"}
    assert prediction.confidence == pytest.approx(scores[0])


def test_classify_batch_in_order_with_one_embedding_call(
    intents: Client, fake_embedder: FakeEmbeddingServer
) -> None:
    before = fake_embedder.behaviour.calls
    predictions = intents.classify_batch(
        "intents", ["top up failed", "card not delivered", "top up with transfer"]
    )
    assert [p.label for p in predictions if isinstance(p, pb.Prediction)] == [
        "top_up",
        "card_arrival",
        "top_up",
    ]
    assert fake_embedder.behaviour.calls == before + 1


def test_a_new_label_changes_the_next_answer(intents: Client) -> None:
    text = "I lost my phone yesterday"
    assert intents.classify("intents", text).label != "lost_phone"
    intents.add_exemplars("intents", [("I lost my phone", "lost_phone")])
    assert intents.classify("intents", text, k=1).label == "lost_phone"


def test_adding_the_same_exemplar_twice_creates_no_duplicate(intents: Client) -> None:
    first = intents.add_exemplars("intents", [EXEMPLARS[0]])
    second = intents.add_exemplars("intents", [EXEMPLARS[0], EXEMPLARS[0]])
    assert first == second[:1] == second[1:]
    assert intents.get_classifier("intents").exemplar_count == len(EXEMPLARS)


def test_caller_ids_and_metadata_round_trip(client: Client) -> None:
    client.create_classifier("c")
    item = ExemplarInput(text="hello there", label="greeting", id="ext-1", metadata={"src": "t"})
    assert client.add_exemplars("c", [item]) == ["ext-1"]
    page = client.list_exemplars("c")
    assert [(e.id, e.text, e.label, dict(e.metadata)) for e in page.exemplars] == [
        ("ext-1", "hello there", "greeting", {"src": "t"})
    ]
    assert client.delete_exemplars("c", ids=["ext-1"]) == 1
    assert client.get_classifier("c").exemplar_count == 0


def test_same_ids_in_two_classifiers_stay_apart(client: Client) -> None:
    client.create_classifier("one")
    client.create_classifier("two")
    client.add_exemplars("one", [ExemplarInput(text="a b", label="x", id="same")])
    client.add_exemplars("two", [ExemplarInput(text="c d", label="y", id="same")])
    assert client.delete_exemplars("one", ids=["same"]) == 1
    assert client.list_labels("two") == {"y": 1}


def test_list_labels_and_delete_by_label(intents: Client) -> None:
    assert intents.list_labels("intents") == {"card_arrival": 3, "top_up": 3}
    assert intents.delete_exemplars("intents", label="top_up") == 3
    assert intents.list_labels("intents") == {"card_arrival": 3}
    assert intents.classify("intents", "top up").label == "card_arrival"


def test_delete_takes_ids_or_a_label_not_both(intents: Client) -> None:
    # A oneof in the request: the client refuses to send both instead of dropping one.
    with pytest.raises(ValueError, match="not both"):
        intents.delete_exemplars("intents", ids=["x"], label="top_up")
    assert intents.list_labels("intents") == {"card_arrival": 3, "top_up": 3}


def test_list_exemplars_pages(client: Client) -> None:
    client.create_classifier("paged")
    client.add_exemplars("paged", [(f"text number {i}", f"l{i % 3}") for i in range(25)])
    texts: list[str] = []
    token = ""
    pages = 0
    while True:
        page = client.list_exemplars("paged", page_size=10, page_token=token)
        texts.extend(e.text for e in page.exemplars)
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert sorted(texts) == sorted(f"text number {i}" for i in range(25))
    only = client.list_exemplars("paged", label="l1", page_size=100)
    assert {e.label for e in only.exemplars} == {"l1"}
    assert len(only.exemplars) == 8


def test_thresholds_give_an_explicit_unknown(intents: Client) -> None:
    far = intents.classify("intents", "zebra quantum", min_similarity=0.5)
    assert far.unknown
    assert far.label == ""
    assert far.unknown_reason == pb.UNKNOWN_REASON_BELOW_MIN_SIMILARITY
    split = intents.classify("intents", "top up card", k=6, min_confidence=0.9)
    assert split.unknown
    assert split.unknown_reason == pb.UNKNOWN_REASON_BELOW_MIN_CONFIDENCE


def test_every_dimension_answers(intents: Client) -> None:
    for dimension in (16, 64):
        prediction = intents.classify("intents", "card not arrived", dimension=dimension)
        assert prediction.label == "card_arrival"


def test_delete_classifier_removes_its_exemplars(intents: Client) -> None:
    assert intents.delete_classifier("intents") == len(EXEMPLARS)
    intents.create_classifier("intents")
    assert intents.get_classifier("intents").exemplar_count == 0
    with pytest.raises(FailedPreconditionError):
        intents.classify("intents", "card")


def test_health_and_reflection(server: ServerThread) -> None:
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING
    assert health_status(server, "knn_classifier.v1.ClassifierService") == (
        health_pb2.HealthCheckResponse.SERVING
    )
    with server.channel() as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert "knn_classifier.v1.ClassifierService" in names


async def test_async_client(server: ServerThread) -> None:
    from knn_classifier.client import AsyncClient

    async with AsyncClient(server.address) as client:
        await client.create_classifier("async")
        ids = await client.add_exemplars("async", EXEMPLARS)
        assert len(ids) == len(EXEMPLARS)
        prediction = await client.classify("async", "top up account")
        assert prediction.label == "top_up"
        batch = await client.classify_batch("async", ["card arrive", "top up"])
        assert [p.label for p in batch if isinstance(p, pb.Prediction)] == [
            "card_arrival",
            "top_up",
        ]
        labels = await client.list_labels("async")
        assert labels == {"card_arrival": 3, "top_up": 3}
        assert labels.etag == (await client.get_classifier("async")).etag
        with pytest.raises(NotFoundError):
            await client.get_classifier("missing")


def test_exemplar_writes_return_the_etag_after_them(client: Client) -> None:
    """add_exemplars and delete_exemplars keep returning the ids and the count, and carry the
    etag the server answered, so conditional writes chain without re-reading."""
    created = client.create_classifier("c")
    added = client.add_exemplars("c", EXEMPLARS, etag=created.etag)
    assert len(added) == len(EXEMPLARS)
    assert isinstance(added, list)
    assert added.etag not in ("", created.etag)
    assert added.etag == client.get_classifier("c").etag
    deleted = client.delete_exemplars("c", label="top_up", etag=added.etag)
    assert deleted == 3
    assert deleted.etag not in ("", added.etag)
    assert deleted.etag == client.get_classifier("c").etag
    client.add_exemplars("c", [("top up please", "top_up")], etag=deleted.etag)


async def test_async_exemplar_writes_return_the_etag_after_them(server: ServerThread) -> None:
    from knn_classifier.client import AsyncClient

    async with AsyncClient(server.address) as client:
        created = await client.create_classifier("c")
        added = await client.add_exemplars("c", EXEMPLARS, etag=created.etag)
        assert len(added) == len(EXEMPLARS)
        assert added.etag == (await client.get_classifier("c")).etag != created.etag
        deleted = await client.delete_exemplars("c", label="top_up", etag=added.etag)
        assert deleted == 3
        assert deleted.etag == (await client.get_classifier("c")).etag != added.etag


# Bad input: each gets its status, writes nothing, and the server stays SERVING ------------------

BAD_INPUTS = [
    ("empty text", lambda c: c.classify("intents", ""), InvalidArgumentError, "empty"),
    ("whitespace text", lambda c: c.classify("intents", " \n\t "), InvalidArgumentError, "empty"),
    (
        "text over the limit",
        lambda c: c.classify("intents", "x" * 8193),
        InvalidArgumentError,
        "8193 characters; the limit is 8192",
    ),
    (
        "batch over the limit",
        lambda c: c.classify_batch("intents", ["a"] * 1025),
        InvalidArgumentError,
        "the limit is 1024",
    ),
    (
        "empty exemplar text",
        lambda c: c.add_exemplars("intents", [("ok text", "a"), ("", "b")]),
        InvalidArgumentError,
        r"exemplars\[1\].text is empty",
    ),
    (
        "empty label",
        lambda c: c.add_exemplars("intents", [("some text", " ")]),
        InvalidArgumentError,
        "label is empty",
    ),
    (
        "exemplar batch over the limit",
        lambda c: c.add_exemplars("intents", [(f"t{i}", "a") for i in range(1025)]),
        InvalidArgumentError,
        "1025 exemplars",
    ),
    (
        "invalid classifier name",
        lambda c: c.create_classifier("bad name!"),
        InvalidArgumentError,
        "invalid classifier name",
    ),
    (
        "invalid name on classify",
        lambda c: c.classify("../etc", "hi"),
        InvalidArgumentError,
        "invalid classifier name",
    ),
    ("unknown classifier", lambda c: c.classify("nope", "hi"), NotFoundError, "'nope'"),
    (
        "existing classifier",
        lambda c: c.create_classifier("intents"),
        AlreadyExistsError,
        "already exists",
    ),
    (
        "dimension not configured",
        lambda c: c.classify("intents", "hi", dimension=32),
        InvalidArgumentError,
        "dimension 32 is not configured; use one of 16, 64",
    ),
    ("k zero", lambda c: c.classify("intents", "hi", k=0), InvalidArgumentError, "k=0"),
    ("k too large", lambda c: c.classify("intents", "hi", k=201), InvalidArgumentError, "k=201"),
    (
        "k too large on create",
        lambda c: c.create_classifier("other", k=1000),
        InvalidArgumentError,
        "k=1000",
    ),
    (
        "min_confidence out of range",
        lambda c: c.classify("intents", "hi", min_confidence=1.5),
        InvalidArgumentError,
        "min_confidence",
    ),
    (
        "delete with neither ids nor label",
        lambda c: c.delete_exemplars("intents"),
        InvalidArgumentError,
        "either ids or a label",
    ),
    (
        "bad page token",
        lambda c: c.list_exemplars("intents", page_token="garbage"),
        InvalidArgumentError,
        "page_token",
    ),
    (
        "negative page size",
        lambda c: c.list_exemplars("intents", page_size=-1),
        InvalidArgumentError,
        "page_size",
    ),
]


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_gets_its_status_and_writes_nothing(
    intents: Client,
    server: ServerThread,
    call: Callable[[Client], object],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        call(intents)
    assert intents.list_labels("intents") == {"card_arrival": 3, "top_up": 3}
    assert [c.name for c in intents.list_classifiers()] == ["intents"]
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING


def test_unknown_voting_enum_value_is_invalid_argument(
    intents: Client, server: ServerThread
) -> None:
    request = pb.ClassifyRequest(
        classifier="intents",
        text="hi",
        options=pb.ClassifyOptions(voting=99),  # type: ignore[arg-type]
    )
    with server.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        classifier_pb2_grpc.ClassifierServiceStub(channel).Classify(request, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_classifying_with_no_exemplars_is_failed_precondition(client: Client) -> None:
    client.create_classifier("empty")
    with pytest.raises(FailedPreconditionError, match="no exemplars"):
        client.classify("empty", "anything")


def test_embedder_400_is_invalid_argument_and_writes_nothing(
    intents: Client, fake_embedder: FakeEmbeddingServer, server: ServerThread
) -> None:
    fake_embedder.behaviour.max_input_chars = 20
    with pytest.raises(InvalidArgumentError, match="rejected the input"):
        intents.add_exemplars("intents", [("a text that the model finds too long", "x")])
    with pytest.raises(InvalidArgumentError):
        intents.classify("intents", "a text that the model finds too long")
    assert intents.list_labels("intents") == {"card_arrival": 3, "top_up": 3}
    assert health_status(server) == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("status", [500, 502, 503])
def test_embedder_5xx_is_unavailable_and_recovers(
    intents: Client, fake_embedder: FakeEmbeddingServer, status: int
) -> None:
    fake_embedder.behaviour.fail_status = status
    fake_embedder.behaviour.fail_times = 100
    with pytest.raises(UnavailableError, match=str(status)):
        intents.add_exemplars("intents", [("brand new text", "new")])
    with pytest.raises(UnavailableError):
        intents.classify("intents", "card")
    assert "new" not in intents.list_labels("intents")
    fake_embedder.behaviour.fail_times = 0
    assert intents.classify("intents", "card arrived").label == "card_arrival"


def test_embedder_unreachable_is_unavailable_and_nothing_is_written(tmp_path: Path) -> None:
    embedder = FakeEmbeddingServer().start()
    running = ServerThread(make_settings(tmp_path, embedder.base_url)).start()
    try:
        with running.client() as client:
            client.create_classifier("c")
            client.add_exemplars("c", EXEMPLARS)
            embedder.stop()
            with pytest.raises(UnavailableError, match="cannot be reached"):
                client.classify("c", "card")
            with pytest.raises(UnavailableError, match="cannot be reached"):
                client.add_exemplars("c", [("another text", "other")])
            assert client.list_labels("c") == {"card_arrival": 3, "top_up": 3}
            assert health_status(running) == health_pb2.HealthCheckResponse.SERVING
    finally:
        running.stop()


def test_classify_batch_fails_only_the_bad_texts(intents: Client) -> None:
    texts = ["top up failed", "", "x" * 8193, "card not delivered"]
    results = intents.classify_batch("intents", texts)
    first, empty, long, last = results
    assert isinstance(first, pb.Prediction)
    assert first.label == "top_up"
    assert isinstance(last, pb.Prediction)
    assert last.label == "card_arrival"
    assert isinstance(empty, InvalidArgumentError)
    assert (empty.details, empty.reason) == ("texts[1] is empty", "FIELD_REQUIRED")
    assert [v.field for v in empty.field_violations] == ["texts[1]"]
    assert isinstance(long, InvalidArgumentError)
    assert "the limit is 8192" in long.details
    assert (long.reason, long.metadata) == (
        "TEXT_TOO_LONG",
        {"limitChars": "8192", "actualChars": "8193"},
    )


def test_classify_batch_isolates_a_text_the_model_rejects(
    intents: Client, fake_embedder: FakeEmbeddingServer
) -> None:
    fake_embedder.behaviour.max_input_chars = 30
    texts = ["top up failed", "a text that the model finds far too long", "card not delivered"]
    results = intents.classify_batch("intents", texts)
    assert [r.label for r in results if isinstance(r, pb.Prediction)] == ["top_up", "card_arrival"]
    rejected = results[1]
    assert isinstance(rejected, InvalidArgumentError)
    assert rejected.reason == "INPUT_REJECTED_BY_MODEL"
    assert [v.field for v in rejected.field_violations] == ["texts[1]"]
    assert "longer than the model's context" in rejected.details
