"""ListExemplars and DeleteExemplars by scope (in-scope exemplars, out-of-scope examples, or
all), through the real server on both stores.

The classifier's negatives name the label ``food`` as their topic, so that a delete or a list
by that label touches both kinds unless the scope says otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest

from knn_classifier.client import Client, InvalidArgumentError
from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc

from .conftest import ServerThread
from .test_cli import ok, run
from .test_open_set_api import foreign_texts, topical_texts


@pytest.fixture
def client(either_store: ServerThread) -> Iterator[Client]:
    with either_store.client() as client:
        yield client


@pytest.fixture
def negative_ids(client: Client) -> set[str]:
    """60 in-scope exemplars of food, money and sport, and negatives: 25 with the topic food,
    5 without a topic. Returns the negatives' ids."""
    client.create_classifier("topics", k=5)
    client.add_exemplars("topics", topical_texts(60, seed=0))
    texts = foreign_texts(30, seed=3)
    topical = client.add_out_of_scope("topics", [(text, "food") for text in texts[:25]])
    bare = client.add_out_of_scope("topics", texts[25:])
    return set(topical) | set(bare)


def listed(client: Client, page_size: int, scope: str, label: str = "") -> list[list[pb.Exemplar]]:
    """Every page of ListExemplars of ``scope`` (and ``label``)."""
    pages, token = [], ""
    while True:
        page = client.list_exemplars(
            "topics", page_size=page_size, page_token=token, label=label, scope=scope
        )
        pages.append(list(page.exemplars))
        token = page.next_page_token
        if not token:
            return pages


def test_list_only_negatives_pages_through_them_all_once(
    client: Client, negative_ids: set[str]
) -> None:
    pages = listed(client, 7, scope="out_of_scope")
    exemplars = [e for page in pages for e in page]
    assert all(len(page) <= 7 for page in pages)
    assert len(pages) == -(-len(negative_ids) // 7)  # no empty page at the end
    assert all(e.out_of_scope for e in exemplars)
    assert sorted(e.id for e in exemplars) == sorted(negative_ids)  # each once

    in_scope = [e for page in listed(client, 7, scope="in_scope") for e in page]
    assert len(in_scope) == 60
    assert not any(e.out_of_scope for e in in_scope)
    food = [e for page in listed(client, 4, label="food", scope="out_of_scope") for e in page]
    assert len(food) == 25
    assert all(e.out_of_scope and e.label == "food" for e in food)
    assert len(list(client.iter_exemplars("topics", label="food", scope="in_scope"))) == 20
    assert len(list(client.iter_exemplars("topics", label="food"))) == 45


def test_a_page_token_binds_the_scope(client: Client, negative_ids: set[str]) -> None:
    token = client.list_exemplars("topics", page_size=5, scope="out_of_scope").next_page_token
    assert token
    for other in ("in_scope", "all"):
        with pytest.raises(InvalidArgumentError, match="label or scope") as caught:
            client.list_exemplars("topics", page_size=5, page_token=token, scope=other)
        assert caught.value.reason == "INVALID_PAGE_TOKEN"
    whole = client.list_exemplars("topics", page_size=5).next_page_token
    with pytest.raises(InvalidArgumentError, match="label or scope"):
        client.list_exemplars("topics", page_size=5, page_token=whole, scope="out_of_scope")


def test_deleting_the_in_scope_exemplars_of_a_label_keeps_its_negatives(
    client: Client, negative_ids: set[str]
) -> None:
    deleted = client.delete_exemplars("topics", label="food", scope="in_scope")
    assert deleted == 20
    assert list(client.iter_exemplars("topics", label="food", scope="in_scope")) == []
    assert client.count_out_of_scope("topics") == len(negative_ids)
    assert client.list_labels("topics") == {"money": 20, "sport": 20}
    # The veto still answers a negative's own text unknown.
    text = next(iter(client.iter_exemplars("topics", scope="out_of_scope"))).text
    assert client.classify("topics", text).unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE


def test_deleting_the_negatives_of_a_label_keeps_its_in_scope_exemplars(
    client: Client, negative_ids: set[str]
) -> None:
    assert client.delete_exemplars("topics", label="food", scope="out_of_scope") == 25
    assert client.count_out_of_scope("topics") == len(negative_ids) - 25
    assert client.list_labels("topics") == {"food": 20, "money": 20, "sport": 20}
    # By ids, the scope filters too: the in-scope ids among them are kept.
    everything = [e.id for e in client.iter_exemplars("topics")]
    assert client.delete_exemplars("topics", ids=everything, scope="out_of_scope") == 5
    assert client.get_classifier("topics").exemplar_count == 60


def test_a_scope_alone_deletes_every_exemplar_of_it_and_all_needs_a_selector(
    client: Client, negative_ids: set[str]
) -> None:
    with pytest.raises(InvalidArgumentError, match="DeleteClassifier") as caught:
        client.delete_exemplars("topics", scope="all")
    assert caught.value.field_violations[0].field == "selector"
    assert client.get_classifier("topics").exemplar_count == 60 + len(negative_ids)

    negative = next(iter(client.iter_exemplars("topics", scope="out_of_scope"))).text
    assert client.classify("topics", negative).unknown_reason == pb.UNKNOWN_REASON_OUT_OF_SCOPE
    assert client.delete_exemplars("topics", scope="out_of_scope") == len(negative_ids)
    assert client.count_out_of_scope("topics") == 0
    assert client.classify("topics", negative).unknown_reason != pb.UNKNOWN_REASON_OUT_OF_SCOPE
    assert client.list_labels("topics") == {"food": 20, "money": 20, "sport": 20}
    assert client.delete_exemplars("topics", scope="in_scope") == 60
    assert client.get_classifier("topics").exemplar_count == 0


@pytest.mark.parametrize("method", ["ListExemplars", "DeleteExemplars"])
def test_an_unknown_scope_is_invalid_argument_and_deletes_nothing(
    either_store: ServerThread, client: Client, negative_ids: set[str], method: str
) -> None:
    request = (
        pb.ListExemplarsRequest(classifier="topics", scope=9)  # type: ignore[arg-type]
        if method == "ListExemplars"
        else pb.DeleteExemplarsRequest(classifier="topics", label="food", scope=9)  # type: ignore[arg-type]
    )
    with either_store.channel() as channel, pytest.raises(grpc.RpcError) as caught:
        getattr(classifier_pb2_grpc.ClassifierServiceStub(channel), method)(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unknown scope 9" in str(caught.value.details())
    assert client.get_classifier("topics").exemplar_count == 60 + len(negative_ids)


def test_the_client_refuses_an_unknown_scope_name(client: Client) -> None:
    with pytest.raises(ValueError, match="in_scope"):
        client.list_exemplars("topics", scope="negatives")


def test_cli_lists_and_deletes_by_scope(server: ServerThread) -> None:
    with server.client() as client:
        client.create_classifier("topics", k=5)
        client.add_exemplars("topics", topical_texts(12, seed=0))
        client.add_out_of_scope("topics", [(text, "food") for text in foreign_texts(3, seed=3)])

        lines = ok(run(server, "exemplars", "topics", "--scope", "out_of_scope")).splitlines()
        assert len(lines) == 3
        assert all(json.loads(line)["out_of_scope"] for line in lines)
        food = ok(run(server, "exemplars", "topics", "--label", "food", "--scope", "in_scope"))
        assert len(food.splitlines()) == 4
        assert all("out_of_scope" not in json.loads(line) for line in food.splitlines())

        deleted = run(
            server, "delete-exemplars", "topics", "--label", "food", "--scope", "in_scope"
        )
        assert "deleted 4 exemplar(s)" in ok(deleted)
        assert client.count_out_of_scope("topics") == 3
        assert "deleted 3 exemplar(s)" in ok(
            run(server, "delete-exemplars", "topics", "--scope", "out_of_scope")
        )
        refused = run(server, "delete-exemplars", "topics")
        assert refused.returncode == 1
        assert "DeleteClassifier" in refused.stderr
        assert run(server, "exemplars", "topics", "--scope", "negatives").returncode == 2
        assert client.get_classifier("topics").exemplar_count == 8
