"""One contract, run unchanged against the embedded store and the Qdrant server store.

The server store runs on ``AsyncQdrantClient(":memory:")``, which has the server's API.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
from qdrant_client import AsyncQdrantClient

from knn_classifier.server.store import EdgeStore, Selection, Store
from knn_classifier.server.store.qdrant_server import QdrantServerStore
from knn_classifier.server.store.schema import ExemplarPayload, exemplar_payload, read_payload

DIMENSIONS = [4, 8]


def unit_rows(rows: list[list[float]], dimension: int) -> np.ndarray:
    matrix = np.zeros((len(rows), dimension), dtype=np.float32)
    for i, row in enumerate(rows):
        matrix[i, : len(row)] = row
    return matrix / np.linalg.norm(matrix, axis=1, keepdims=True)


def payload(classifier: str, label: str, text: str) -> ExemplarPayload:
    return read_payload({"classifier": classifier, "label": label, "text": text, "id": text})


def ids(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


@pytest.fixture(params=["edge", "qdrant-server"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "edge":
        opened: Store = EdgeStore(tmp_path)
    else:
        opened = QdrantServerStore(AsyncQdrantClient(location=":memory:"), "test")
    await opened.open(DIMENSIONS)
    yield opened
    await opened.close()


async def fill(store: Store) -> list[str]:
    """Three points of classifier a (two 'x', one 'y') and one of b, in every dimension."""
    point_ids = ids(4)
    rows: list[list[float]] = [[1, 0], [0.9, 0.1], [0, 1], [1, 0]]
    payloads = [
        payload("a", "x", "a1"),
        payload("a", "x", "a2"),
        payload("a", "y", "a3"),
        payload("b", "x", "b1"),
    ]
    for d in DIMENSIONS:
        await store.upsert(d, point_ids, unit_rows(rows, d), payloads)
    return point_ids


async def test_query_is_scoped_to_the_classifier_and_ordered(store: Store) -> None:
    await fill(store)
    for d in DIMENSIONS:
        results = await store.query(d, "a", unit_rows([[1, 0], [0, 1]], d), 10)
        assert [r.payload["text"] for r in results[0]] == ["a1", "a2", "a3"]
        assert results[0][0].score == pytest.approx(1.0, abs=1e-5)
        assert results[0][2].score == pytest.approx(0.0, abs=1e-5)
        assert results[1][0].payload["text"] == "a3"
        only_b = await store.query(d, "b", unit_rows([[0, 1]], d), 10)
        assert [r.payload["text"] for r in only_b[0]] == ["b1"]


async def test_query_limit_and_unknown_classifier(store: Store) -> None:
    await fill(store)
    assert len((await store.query(4, "a", unit_rows([[1, 0]], 4), 2))[0]) == 2
    assert await store.query(4, "nobody", unit_rows([[1, 0]], 4), 2) == [[]]


async def test_queries_see_every_write_made_after_the_first_query(store: Store) -> None:
    """The embedded store answers from in-memory copies; they must follow every write."""
    point_ids = await fill(store)
    d = 4
    near_y = unit_rows([[0.1, 1]], d)

    async def texts() -> list[str]:
        return [r.payload["text"] for r in (await store.query(d, "a", near_y, 10))[0]]

    assert (await texts())[0] == "a3"
    added = ids(1)
    await store.upsert(d, added, unit_rows([[0.1, 1]], d), [payload("a", "z", "a4")])
    assert (await texts())[0] == "a4"
    await store.upsert(d, added, unit_rows([[1, -0.1]], d), [payload("a", "z", "a4 moved")])
    assert await texts() == ["a3", "a2", "a1", "a4 moved"]
    await store.delete(d, Selection("a", label="y"))
    assert await texts() == ["a2", "a1", "a4 moved"]
    await store.delete(d, Selection("a", ids=[point_ids[1], point_ids[3]]))  # b1 is not a's
    assert await texts() == ["a1", "a4 moved"]
    await store.delete(d, Selection("a"))
    assert await texts() == []
    await store.upsert(d, ids(1), unit_rows([[0, 1]], d), [payload("a", "y", "a5")])
    assert await texts() == ["a5"]
    assert [r.payload["text"] for r in (await store.query(d, "b", near_y, 10))[0]] == ["b1"]


async def test_negative_exemplars_are_selected_apart(store: Store) -> None:
    """Queries, counts, label counts and deletes can take the negative exemplars alone or the
    others alone; points written without the flag count as in scope. The embedded store's
    in-memory copy must follow flag changes too (the same id re-written with the other flag)."""
    point_ids = await fill(store)
    negatives = ids(2)
    rows = [[0.95, 0.05], [0.2, 1]]
    flagged = [
        exemplar_payload("a", text, "weather", text, {}, 0.0, out_of_scope=True)
        for text in ("n1", "n2")
    ]
    d = 4
    near_x = unit_rows([[1, 0]], d)

    async def texts(out_of_scope: bool | None, k: int = 10) -> list[str]:
        hits = (await store.query(d, "a", near_x, k, out_of_scope))[0]
        return [r.payload["text"] for r in hits]

    assert await texts(True) == []  # loads the embedded store's copy before the write
    await store.upsert(d, negatives, unit_rows(rows, d), flagged)
    assert await texts(None) == ["a1", "n1", "a2", "n2", "a3"]
    assert await texts(False) == ["a1", "a2", "a3"]
    assert await texts(True) == ["n1", "n2"]
    assert await texts(True, 1) == ["n1"]
    hit = (await store.query(d, "a", near_x, 1, True))[0][0]
    assert hit.payload["out_of_scope"] is True
    assert hit.payload["label"] == "weather"
    assert (await store.query(d, "b", near_x, 1, True)) == [[]]
    assert await store.count(d, Selection("a", out_of_scope=True)) == 2
    assert await store.count(d, Selection("a", out_of_scope=False)) == 3
    assert await store.label_counts(d, "a", out_of_scope=False) == {"x": 2, "y": 1}
    assert await store.label_counts(d, "a", out_of_scope=True) == {"weather": 2}
    await store.upsert(d, negatives[:1], unit_rows(rows[:1], d), [payload("a", "x", "n1")])
    assert await texts(True) == ["n2"]
    assert await texts(False) == ["a1", "n1", "a2", "a3"]
    await store.delete(d, Selection("a", ids=[point_ids[0], negatives[1]]))
    assert await texts(True) == []
    assert await texts(False) == ["n1", "a2", "a3"]


async def test_count_and_label_counts(store: Store) -> None:
    await fill(store)
    assert await store.count(4, Selection("a")) == 3
    assert await store.count(4, Selection("a", label="x")) == 2
    assert await store.label_counts(8, "a") == {"x": 2, "y": 1}
    assert await store.label_counts(8, "nobody") == {}


async def test_classifier_counts_cover_every_classifier_with_points(store: Store) -> None:
    """Start-up compares these with the classifier records, so meta records are not counted."""
    await store.put_meta("classifier:c", {"kind": "classifier", "name": "c"})
    assert await store.classifier_counts(4) == {}
    await fill(store)
    assert await store.classifier_counts(4) == {"a": 3, "b": 1}
    await store.delete(8, Selection("a"))
    assert await store.classifier_counts(8) == {"b": 1}
    assert await store.classifier_counts(4) == {"a": 3, "b": 1}


async def test_upsert_same_id_replaces(store: Store) -> None:
    point_ids = await fill(store)
    await store.upsert(4, point_ids[:1], unit_rows([[0, 1]], 4), [payload("a", "y", "a1")])
    assert await store.label_counts(4, "a") == {"x": 1, "y": 2}
    assert await store.count(4, Selection("a")) == 3


async def test_delete_by_ids_by_label_and_all(store: Store) -> None:
    point_ids = await fill(store)
    # An id of another classifier is not deleted through classifier a.
    await store.delete(4, Selection("a", ids=[point_ids[0], point_ids[3]]))
    assert await store.count(4, Selection("a")) == 2
    assert await store.count(4, Selection("b")) == 1
    await store.delete(4, Selection("a", label="y"))
    assert await store.label_counts(4, "a") == {"x": 1}
    await store.delete(4, Selection("a"))
    assert await store.count(4, Selection("a")) == 0
    assert await store.count(8, Selection("a")) == 3  # other dimensions are separate


async def test_scroll_pages_through_everything_once(store: Store) -> None:
    point_ids = ids(25)
    payloads = [payload("a", "x", f"t{i}") for i in range(25)]
    await store.upsert(4, point_ids, unit_rows([[1, i] for i in range(25)], 4), payloads)
    seen: list[str] = []
    offset = None
    while True:
        page, offset = await store.scroll(4, Selection("a"), 10, offset)
        assert len(page) <= 10
        seen.extend(r.payload["text"] for r in page)
        if offset is None:
            break
    assert sorted(seen) == sorted(p["text"] for p in payloads)
    page, _ = await store.scroll(4, Selection("a", label="nope"), 10, None)
    assert page == []


async def test_meta_records(store: Store) -> None:
    assert await store.get_meta("classifier:a") is None
    await store.put_meta("classifier:a", {"kind": "classifier", "name": "a"})
    await store.put_meta("classifier:b", {"kind": "classifier", "name": "b"})
    await store.put_meta("other", {"kind": "fingerprint", "width": 3})
    assert (await store.get_meta("classifier:a") or {})["name"] == "a"
    names = sorted(p["name"] for p in await store.list_meta("classifier"))
    assert names == ["a", "b"]
    await store.delete_meta("classifier:a")
    assert await store.get_meta("classifier:a") is None
    assert [p["name"] for p in await store.list_meta("classifier")] == ["b"]


async def test_existing_dimensions(store: Store) -> None:
    assert await store.existing_dimensions() == DIMENSIONS


async def test_vectors_returns_every_point_of_the_classifier_with_its_vector(store: Store) -> None:
    await fill(store)
    records, matrix = await store.vectors(8, "a")
    assert sorted(r.payload["text"] for r in records) == ["a1", "a2", "a3"]
    assert matrix.shape == (3, 8)
    by_text = {r.payload["text"]: row for r, row in zip(records, matrix, strict=True)}
    np.testing.assert_allclose(by_text["a3"], unit_rows([[0, 1]], 8)[0], atol=1e-6)
    empty, nothing = await store.vectors(8, "nobody")
    assert empty == []
    assert nothing.shape == (0, 8)


async def test_point_ids_and_retrieve(store: Store) -> None:
    point_ids = await fill(store)
    assert await store.point_ids(4, "a") == set(point_ids[:3])
    records, matrix = await store.retrieve(8, [point_ids[2], str(uuid.uuid4())])
    assert [r.id for r in records] == [point_ids[2]]
    assert records[0].payload["text"] == "a3"
    np.testing.assert_allclose(matrix[0], unit_rows([[0, 1]], 8)[0], atol=1e-6)


@pytest.mark.parametrize("queried_first", [False, True])
async def test_vectors_follow_writes(store: Store, queried_first: bool) -> None:
    """Label models are fitted from vectors() read after a write (derived.py): it must see it,
    whether or not a query loaded the classifier first (the embedded store then answers from
    its in-memory copy)."""
    point_ids = await fill(store)
    if queried_first:
        await store.query(4, "a", unit_rows([[1, 0]], 4), 1)
    await store.delete(4, Selection("a", ids=[point_ids[1]]))
    await store.upsert(4, ids(1), unit_rows([[0, 0, 1]], 4), [payload("a", "z", "a4")])
    records, matrix = await store.vectors(4, "a")
    by_text = {
        r.payload["text"]: (r.payload["label"], row) for r, row in zip(records, matrix, strict=True)
    }
    assert sorted(by_text) == ["a1", "a3", "a4"]
    assert by_text["a4"][0] == "z"
    np.testing.assert_allclose(by_text["a4"][1], unit_rows([[0, 0, 1]], 4)[0], atol=1e-6)
    assert [r.id for r in records] == sorted(r.id for r in records)


async def test_payloads_read_back_whole_and_old_points_read_without_metadata(store: Store) -> None:
    point_ids = ids(2)
    whole = exemplar_payload("a", "e1", "x", "t1", {"source": "faq"}, 1700000000.5)
    old = {"classifier": "a", "id": "e2", "label": "x", "text": "t2"}  # before metadata
    await store.upsert(4, point_ids, unit_rows([[1, 0], [0, 1]], 4), [whole, old])  # type: ignore[list-item]
    records, _ = await store.retrieve(4, point_ids)
    by_id = {r.id: r.payload for r in records}
    assert by_id[point_ids[0]] == whole
    assert by_id[point_ids[1]] == {
        **old,
        "metadata": {},
        "created_at": 0.0,
        "out_of_scope": False,
    }
    page, _ = await store.scroll(4, Selection("a"), 10, None)
    assert {r.id: r.payload for r in page} == by_id
    hits = (await store.query(4, "a", unit_rows([[1, 0]], 4), 1))[0]
    assert hits[0].payload == whole
    snapshot, _ = await store.vectors(4, "a")
    assert {r.id: r.payload for r in snapshot} == {
        point_id: without_metadata(payload) for point_id, payload in by_id.items()
    }


@pytest.mark.parametrize("queried_first", [False, True])
async def test_a_snapshot_carries_every_field_but_the_metadata_in_payloads_of_its_own(
    store: Store, queried_first: bool
) -> None:
    """Store.vectors leaves the metadata out (its callers, the label models and Evaluate, read
    none), whether the store reads its points or, once a query loaded it, the embedded store's
    in-memory copy; a snapshot's payloads are the caller's: changing one changes no later
    answer."""
    point_ids = ids(3)
    payloads = [
        exemplar_payload("a", "e1", "x", "t1", {"source": "faq", "n": "1"}, 1.5),
        exemplar_payload("a", "e2", "y", "t2", {}, 2.5),
        exemplar_payload("a", "e3", "z", "t3", {"source": "crm"}, 3.5, out_of_scope=True),
    ]
    vectors = unit_rows([[1, 0, 0], [0, 1, 0], [0, 0, 1]], 4)
    await store.upsert(4, point_ids, vectors, payloads)
    if queried_first:
        await store.query(4, "a", vectors[:1], 1)
    expected = {
        point_id: without_metadata(payload)
        for point_id, payload in zip(point_ids, payloads, strict=True)
    }
    records, _ = await store.vectors(4, "a")
    assert {r.id: r.payload for r in records} == expected
    for record in records:
        record.payload["label"] = "changed by a caller"
        record.payload["out_of_scope"] = not record.payload["out_of_scope"]
    again, _ = await store.vectors(4, "a")
    assert {r.id: r.payload for r in again} == expected
    hits = (await store.query(4, "a", vectors[:1], 3))[0]
    assert {h.id: h.payload for h in hits} == dict(zip(point_ids, payloads, strict=True))


def without_metadata(payload: ExemplarPayload) -> dict[str, object]:
    return {key: value for key, value in payload.items() if key != "metadata"}
