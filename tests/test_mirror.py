"""The embedded store's in-memory copies: exact search, writes in any order, and a restart."""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import threading
import tracemalloc
import uuid
from pathlib import Path
from types import CodeType, FrameType

import numpy as np
import pytest

from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.base import Payload, SnapshotRecord
from knn_classifier.server.store.edge import QUERY_OFF_LOOP_WORK
from knn_classifier.server.store.edge_reads import count_points, stack_pages
from knn_classifier.server.store.mirror import Mirror, query_work
from knn_classifier.server.store.schema import exemplar_payload, read_payload, stored_payload


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    rows = rng.standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_random_writes_and_deletes_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    pick = random.Random(0)
    mirror = Mirror(16)
    truth: dict[str, tuple[np.ndarray, str, bool]] = {}
    for step in range(300):
        action = pick.random()
        if action < 0.6 or not truth:
            names = [pick.choice([*truth, str(uuid.uuid4())]) for _ in range(pick.randint(1, 5))]
            names = list(dict.fromkeys(names))
            vectors = unit(rng, len(names), 16) * 3  # not unit length: the copy normalises
            labels = [f"l{pick.randrange(4)}" for _ in names]
            scopes = [pick.random() < 0.3 for _ in names]
            payloads = [
                exemplar_payload("c", n, y, n, {}, step, negative)
                for n, y, negative in zip(names, labels, scopes, strict=True)
            ]
            mirror.upsert(names, vectors, payloads)
            for n, v, y, negative in zip(names, vectors, labels, scopes, strict=True):
                truth[n] = (v / np.linalg.norm(v), y, negative)
        elif action < 0.8:
            doomed = pick.sample(sorted(truth), min(len(truth), 3))
            mirror.delete(Selection("c", ids=doomed))
            for n in doomed:
                del truth[n]
        else:  # by label, by scope, or both
            label = pick.choice([None, f"l{pick.randrange(4)}"])
            scope = pick.choice([None, False, True]) if label else pick.choice([False, True])
            mirror.delete(Selection("c", label=label, out_of_scope=scope))
            truth = {
                n: (v, y, negative)
                for n, (v, y, negative) in truth.items()
                if (label is not None and y != label) or (scope is not None and negative != scope)
            }
        assert len(mirror) == len(truth)
        if truth and step % 10 == 0:
            queries = unit(rng, 3, 16)
            names = sorted(truth)
            matrix = np.stack([truth[n][0] for n in names])
            expected = np.argsort(-(queries @ matrix.T), axis=1)[:, :5]
            for hits, want in zip(mirror.query(queries, 5), expected, strict=True):
                assert [h.id for h in hits] == [names[i] for i in want]
                assert all(h.payload["label"] == truth[h.id][1] for h in hits)
            negatives = {n for n, (_, _, negative) in truth.items() if negative}
            hits = mirror.query(queries[:1], len(truth), out_of_scope=True)[0]
            assert {h.id for h in hits} == negatives
            records, vectors = mirror.frozen().snapshot()
            assert [r.id for r in records] == names
            np.testing.assert_allclose(vectors, matrix, atol=1e-6)


def test_k_larger_than_the_classifier_and_an_empty_copy() -> None:
    mirror = Mirror(2)
    assert mirror.query(np.array([[1.0, 0.0]], dtype=np.float32), 3) == [[]]
    mirror.upsert(
        ["p", "q"],
        np.array([[1, 0], [0, 1]], dtype=np.float32),
        [read_payload({}), read_payload({})],
    )
    hits = mirror.query(np.array([[1.0, 0.2]], dtype=np.float32), 10)[0]
    assert [h.id for h in hits] == ["p", "q"]
    assert hits[0].score > hits[1].score


async def test_a_restarted_store_answers_from_what_it_wrote(tmp_path: Path) -> None:
    store = EdgeStore(tmp_path)
    await store.open([4])
    point_ids = [str(uuid.uuid4()) for _ in range(3)]
    vectors = np.eye(4, dtype=np.float32)[:3]
    payloads = [
        read_payload({"classifier": "c", "id": str(i), "label": "x", "text": f"t{i}"})
        for i in range(3)
    ]
    await store.upsert(4, point_ids, vectors, payloads)
    assert len((await store.query(4, "c", vectors[:1], 10))[0]) == 3  # loads the copy
    await store.delete(4, Selection("c", ids=point_ids[:1]))
    await store.close()

    reopened = EdgeStore(tmp_path)
    await reopened.open([4])
    hits = (await reopened.query(4, "c", vectors[1:2], 10))[0]
    await reopened.close()
    assert [h.payload["text"] for h in hits] == ["t1", "t2"]
    assert hits[0].score == pytest.approx(1.0)


async def written_store(path: Path, count: int, dimension: int) -> tuple[list[str], np.ndarray]:
    """A closed store at ``path`` holding ``count`` points of classifier c; their ids and unit
    vectors."""
    store = EdgeStore(path)
    await store.open([dimension])
    point_ids = [str(uuid.uuid4()) for _ in range(count)]
    vectors = unit(np.random.default_rng(1), count, dimension)
    payloads = [
        read_payload({"classifier": "c", "id": str(i), "label": f"l{i % 7}", "text": f"t{i}"})
        for i in range(count)
    ]
    for start in range(0, count, 1000):
        rows = slice(start, start + 1000)
        await store.upsert(dimension, point_ids[rows], vectors[rows], payloads[rows])
    await store.close()
    return point_ids, vectors


async def test_loading_spans_many_pages(tmp_path: Path) -> None:
    """A classifier of several scroll pages loads whole, from the shard and into the copy."""
    point_ids, vectors = await written_store(tmp_path, 2_500, 8)
    order = np.argsort(point_ids)  # a store gives a classifier's points in id order
    store = EdgeStore(tmp_path)
    await store.open([8])
    try:
        from_shard = await store.vectors(8, "c")  # no query yet: read from the shard
        queries = vectors[:5]
        hits = await store.query(8, "c", queries, 10)  # loads the copy
        from_copy = await store.vectors(8, "c")
    finally:
        await store.close()
    for records, matrix in (from_shard, from_copy):
        assert [r.id for r in records] == [point_ids[i] for i in order]
        assert [r.payload["label"] for r in records] == [f"l{i % 7}" for i in order]
        np.testing.assert_allclose(matrix, vectors[order], atol=1e-6)
    expected = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    assert [[h.id for h in row] for row in hits] == [[point_ids[i] for i in e] for e in expected]


async def test_the_first_writes_after_a_load_fill_the_copy_in_place(tmp_path: Path) -> None:
    """A load allocated the copy for the classifier's points exactly, so the first upsert after
    it grew the copy (a new matrix, the old copied into it, on the event loop); the load now
    allocates the room that growth would have added, in its worker thread, and the writes
    after it fill that room in place."""
    count, dimension = 1_000, 8
    await written_store(tmp_path, count, dimension)
    store = EdgeStore(tmp_path)
    await store.open([dimension])
    try:
        await store.query(dimension, "c", np.ones((1, dimension), dtype=np.float32), 1)
        copy = store._mirrors[(dimension, "c")]  # the loaded copy, to read its capacity
        loaded = copy.capacity
        added = count // 4  # what the first growth added
        new_ids = [str(uuid.uuid4()) for _ in range(added)]
        new_vectors = unit(np.random.default_rng(4), added, dimension)
        payloads = [exemplar_payload("c", i, "new", i, {}, 0) for i in new_ids]
        await store.upsert(dimension, new_ids, new_vectors, payloads)
        hits = await store.query(dimension, "c", new_vectors, 1)
    finally:
        await store.close()
    assert (len(copy), copy.capacity) == (count + added, loaded)
    assert [row[0].id for row in hits] == new_ids


@pytest.mark.parametrize("how", ["query", "vectors"])
async def test_loading_holds_one_page_of_python_floats_not_the_classifier(
    tmp_path: Path, how: str
) -> None:
    """Edge returns vectors as lists of Python floats (32 bytes each with the list's slot);
    loading converts them a page (at most 1,000 points) at a time, so what it allocates
    beyond what it keeps stays near one page's, where a whole classifier's were held at once
    before."""
    count, dimension = 10_000, 64
    _, vectors = await written_store(tmp_path, count, dimension)
    store = EdgeStore(tmp_path)
    await store.open([dimension])
    tracemalloc.start()
    try:
        if how == "query":
            kept: object = await store.query(dimension, "c", vectors[:1], 1)
        else:
            kept = await store.vectors(dimension, "c")
        settled, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await store.close()
    assert kept
    page_of_floats = 1_000 * dimension * 32
    classifier_of_floats = count * dimension * 32
    assert peak - settled < 2 * page_of_floats < classifier_of_floats / 4


@pytest.mark.parametrize("capacity", [0, 2, 5, 9])
def test_stacked_pages_are_whole_whatever_the_count_guessed(capacity: int) -> None:
    """Store.vectors reads pages into a matrix allocated at a count taken before them; points
    written or deleted in between make the count wrong, never the result."""
    rng = np.random.default_rng(2)
    sizes = [2, 3, 0, 1]
    pages: list[tuple[list[str], np.ndarray, list[Payload | None]]] = [
        (
            [f"p{n}-{i}" for i in range(size)],
            unit(rng, size, 4),
            [{"id": f"p{n}-{i}"} for i in range(size)],
        )
        for n, size in enumerate(sizes)
    ]
    records, matrix = stack_pages(iter(pages), capacity, 4)
    assert [r.id for r in records] == [i for ids, _, _ in pages for i in ids]
    assert [r.payload["id"] for r in records] == [r.id for r in records]
    np.testing.assert_array_equal(matrix, np.concatenate([v for _, v, _ in pages]))


WAIT = 30.0
"""A generous bound on waits between the test and the snapshot's worker thread."""


class CallGate:
    """A hook on calls of one function (a profile function, in this thread and in threads
    started while it is open, such as the event loop's worker threads): every call notes its
    thread, and the first waits until the test releases it, unless it is made on the thread
    that opened the gate (the event loop's, which waiting would stop). Tests using it run on an
    event loop of their own, whose worker threads start inside the gate."""

    def __init__(self, code: CodeType) -> None:
        self.code = code
        self.threads: list[int] = []
        self.entered = threading.Event()
        self.release = threading.Event()
        self.opener = threading.get_ident()

    def __enter__(self) -> CallGate:
        threading.setprofile(self._profile)
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        sys.setprofile(None)
        threading.setprofile(None)

    def _profile(self, frame: FrameType, event: str, _: object) -> None:
        if event == "call" and frame.f_code is self.code:
            self.threads.append(threading.get_ident())
            if not self.entered.is_set():
                self.entered.set()
                if threading.get_ident() != self.opener:
                    self.release.wait(WAIT)


def record_gate() -> CallGate:
    """A gate on the building of a snapshot's records (:class:`SnapshotRecord`)."""
    return CallGate(SnapshotRecord.__init__.__code__)


async def gated_store(path: Path, load: bool = True) -> tuple[EdgeStore, list[str], np.ndarray]:
    """An open store whose copy of classifier c holds 50 points (without ``load``, whose
    classifier c holds them, its copy loaded by the first query)."""
    store = EdgeStore(path)
    await store.open([4])
    if load:
        await store.query(4, "c", np.ones((1, 4), dtype=np.float32), 1)  # loads the (empty) copy
    point_ids = [str(uuid.uuid4()) for _ in range(50)]
    vectors = unit(np.random.default_rng(3), 50, 4)
    payloads = [read_payload({"classifier": "c", "id": i, "label": i}) for i in point_ids]
    await store.upsert(4, point_ids, vectors, payloads)
    return store, point_ids, vectors


@pytest.mark.asyncio(loop_scope="function")
async def test_a_snapshot_of_the_copy_is_built_off_the_event_loop(tmp_path: Path) -> None:
    """Issue 12: building a record per point held the event loop (0.4 s at 100k points). While
    the build is held at its gate, the loop runs other tasks and the snapshot is still
    pending; on the event loop, the build would have run to its end before either."""
    with record_gate() as gate:
        store, point_ids, vectors = await gated_store(tmp_path)
        try:
            snapshot = asyncio.create_task(store.vectors(4, "c"))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            other_task = asyncio.create_task(asyncio.sleep(0, result="ran"))
            assert await other_task == "ran"
            assert not snapshot.done()
            gate.release.set()
            records, matrix = await snapshot
        finally:
            await store.close()
    assert threading.get_ident() not in gate.threads
    order = np.argsort(point_ids)
    assert [r.id for r in records] == [point_ids[i] for i in order]
    np.testing.assert_allclose(matrix, vectors[order], atol=1e-6)


@pytest.mark.asyncio(loop_scope="function")
async def test_writes_racing_a_snapshot_neither_tear_it_nor_are_lost(tmp_path: Path) -> None:
    """A snapshot is the copy as it was when asked for, record i beside its own vector, though
    the copy's rows are rewritten and moved while the records are built; the writes stay."""
    with record_gate() as gate:
        store, point_ids, vectors = await gated_store(tmp_path)
        added = str(uuid.uuid4())
        rewritten = unit(np.random.default_rng(4), 2, 4)
        payloads = [
            read_payload({"classifier": "c", "id": i, "label": i}) for i in (point_ids[0], added)
        ]
        try:
            snapshot = asyncio.create_task(store.vectors(4, "c"))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            assert not snapshot.done()
            # Rewrites row 0 in place, adds a row, moves the last row into row 1's place.
            await store.upsert(4, [point_ids[0], added], rewritten, payloads)
            await store.delete(4, Selection("c", ids=[point_ids[1]]))
            gate.release.set()
            records, matrix = await snapshot
            after_records, after_matrix = await store.vectors(4, "c")
        finally:
            await store.close()
    order = np.argsort(point_ids)
    assert [r.id for r in records] == [point_ids[i] for i in order]
    assert [r.payload["label"] for r in records] == [r.id for r in records]
    np.testing.assert_allclose(matrix, vectors[order], atol=1e-6)

    now = {i: v for i, v in zip(point_ids, vectors, strict=True)}
    now.update({point_ids[0]: rewritten[0], added: rewritten[1]})
    del now[point_ids[1]]
    assert [r.id for r in after_records] == sorted(now)
    np.testing.assert_allclose(after_matrix, np.stack([now[i] for i in sorted(now)]), atol=1e-6)


async def ran_meanwhile() -> bool:
    """Whether a task created now runs to its end: the tasks created before it ran up to their
    first wait first, and the event loop is not held."""
    return await asyncio.create_task(asyncio.sleep(0, result=True))


@pytest.mark.asyncio(loop_scope="function")
async def test_a_copy_is_frozen_off_the_event_loop_while_writes_to_it_wait(tmp_path: Path) -> None:
    """Issue 12: freezing the copy for a snapshot copied its matrix on the event loop (tens of
    milliseconds at 100k points). While the freeze is held at its gate in a worker thread,
    queries of the copy are answered and a write to it waits; the snapshot is the copy as it
    was, and the write lands after it."""
    with CallGate(Mirror.frozen.__code__) as gate:
        store, point_ids, vectors = await gated_store(tmp_path)
        added = str(uuid.uuid4())
        payload = read_payload({"classifier": "c", "id": added, "label": added})
        try:
            snapshot = asyncio.create_task(store.vectors(4, "c"))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            hits = await store.query(4, "c", vectors[:1], 1)
            write = asyncio.create_task(store.upsert(4, [added], vectors[:1], [payload]))
            assert await ran_meanwhile()
            assert not snapshot.done()
            assert not write.done()
            gate.release.set()
            records, matrix = await snapshot
            await write
            after_records, _ = await store.vectors(4, "c")
        finally:
            await store.close()
    assert gate.threads
    assert threading.get_ident() not in gate.threads
    assert hits[0][0].id == point_ids[0]
    order = np.argsort(point_ids)
    assert [r.id for r in records] == [point_ids[i] for i in order]
    np.testing.assert_allclose(matrix, vectors[order], atol=1e-6)
    assert [r.id for r in after_records] == sorted([*point_ids, added])


@pytest.mark.asyncio(loop_scope="function")
async def test_a_copy_is_loaded_off_the_event_loop_once_for_the_queries_meanwhile(
    tmp_path: Path,
) -> None:
    """Issue 12: the first query of a classifier loaded its copy from the shard, page by page,
    on the event loop. While the load is held at its gate (its count of the classifier's
    points) in a worker thread, other tasks run; a second query shares the load rather than
    starting another, and a write to the classifier waits, so that the copy misses it not."""
    added = str(uuid.uuid4())
    payload = read_payload({"classifier": "c", "id": added, "label": "new"})
    with CallGate(count_points.__code__) as gate:
        # Inside the gate: its upserts start the loop's worker threads.
        point_ids, vectors = await written_store(tmp_path, 2_500, 8)  # several pages
        store = EdgeStore(tmp_path)
        await store.open([8])
        try:
            first = asyncio.create_task(store.query(8, "c", vectors[:1], 1))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            second = asyncio.create_task(store.query(8, "c", vectors[1:2], 1))
            write = asyncio.create_task(store.upsert(8, [added], -vectors[:1], [payload]))
            assert await ran_meanwhile()
            assert not first.done()
            assert not second.done()
            assert not write.done()
            gate.release.set()
            hits = [*await first, *await second]
            await write
            newest = await store.query(8, "c", -vectors[:1], 1)
        finally:
            await store.close()
    assert len(gate.threads) == 1  # one load for both queries
    assert threading.get_ident() not in gate.threads
    assert [row[0].id for row in hits] == point_ids[:2]
    assert newest[0][0].id == added


@pytest.mark.asyncio(loop_scope="function")
async def test_a_load_that_ends_after_its_store_closed_is_not_kept(tmp_path: Path) -> None:
    """A load running in a worker thread when the store closes (held here after its last read
    of the shard) must not leave its copy to the store opened again: that copy would miss what
    was written in between."""
    added = str(uuid.uuid4())
    payload = read_payload({"classifier": "c", "id": added, "label": "new"})
    with CallGate(Mirror.upsert.__code__) as gate:
        point_ids, vectors = await written_store(tmp_path, 3, 4)  # loads no copy
        store = EdgeStore(tmp_path)
        await store.open([4])
        try:
            loading = asyncio.create_task(store.query(4, "c", vectors[:1], 1))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            await store.close()
            writer = EdgeStore(tmp_path)
            await writer.open([4])
            await writer.upsert(4, [added], -vectors[:1], [payload])
            await writer.close()
            gate.release.set()
            assert [row[0].id for row in await loading] == point_ids[:1]
            await store.open([4])
            hits = await store.query(4, "c", -vectors[:1], 1)
        finally:
            await store.close()
    assert hits[0][0].id == added


LARGE = 256
"""Query vectors enough for a query of 50 points at k=50 to run in a worker thread."""


def query_gate() -> CallGate:
    """A gate on :meth:`Mirror.query`, in whose call the matrix product runs."""
    assert query_work(LARGE, 50, 4, 50) >= QUERY_OFF_LOOP_WORK > query_work(1, 50, 4, 1)
    return CallGate(Mirror.query.__code__)


def large(vectors: np.ndarray) -> np.ndarray:
    return np.resize(vectors, (LARGE, vectors.shape[1]))


def expected_ids(point_ids: list[str], vectors: np.ndarray, queries: np.ndarray) -> list[str]:
    """The id of each query's nearest point."""
    return [point_ids[i] for i in np.argmax(queries @ vectors.T, axis=1)]


@pytest.mark.asyncio(loop_scope="function")
async def test_a_large_query_runs_off_the_event_loop_while_a_write_waits(tmp_path: Path) -> None:
    """A ClassifyBatch of 256 texts at k=200 on 100k points held the event loop for 0.5-1.6 s.
    While a large query is held at its gate in a worker thread, another task runs, and a write
    to the classifier waits; the query answers from the copy as it was, and the write lands."""
    with query_gate() as gate:
        store, point_ids, vectors = await gated_store(tmp_path, load=False)
        added = str(uuid.uuid4())
        payload = read_payload({"classifier": "c", "id": added, "label": added})
        try:
            query = asyncio.create_task(store.query(4, "c", large(vectors), 50))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            write = asyncio.create_task(store.upsert(4, [added], -vectors[:1], [payload]))
            assert await ran_meanwhile()
            assert not query.done()
            assert not write.done()
            gate.release.set()
            hits = await query
            await write
            newest = await store.query(4, "c", -vectors[:1], 1)
        finally:
            await store.close()
    assert threading.get_ident() not in gate.threads[:1]  # the large query's
    assert [row[0].id for row in hits] == large(np.array(point_ids)[:, None])[:, 0].tolist()
    assert all(len(row) == 50 for row in hits)
    assert newest[0][0].id == added


@pytest.mark.asyncio(loop_scope="function")
async def test_writes_racing_a_large_query_neither_tear_it_nor_are_lost(tmp_path: Path) -> None:
    """A large query in a worker thread answers from the copy as it was when asked, each hit's
    id beside its own payload and score, though an upsert rewrites and adds rows and a delete
    moves the last row into a deleted one's place meanwhile; both writes stay."""
    with query_gate() as gate:
        store, point_ids, vectors = await gated_store(tmp_path, load=False)
        added = str(uuid.uuid4())
        rewritten = -vectors[:2]
        payloads = [
            read_payload({"classifier": "c", "id": i, "label": i}) for i in (point_ids[0], added)
        ]
        queries = large(unit(np.random.default_rng(5), 7, 4))
        try:
            query = asyncio.create_task(store.query(4, "c", queries, 50))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            upsert = asyncio.create_task(
                store.upsert(4, [point_ids[0], added], rewritten, payloads)
            )
            delete = asyncio.create_task(store.delete(4, Selection("c", ids=[point_ids[1]])))
            assert await ran_meanwhile()
            assert not upsert.done()
            assert not delete.done()
            gate.release.set()
            hits = await query
            await upsert
            await delete
            after = await store.query(4, "c", queries, 50)
        finally:
            await store.close()
    by_id = dict(zip(point_ids, vectors, strict=True))
    assert [row[0].id for row in hits] == expected_ids(point_ids, vectors, queries)
    for query_vector, row in zip(queries, hits, strict=True):
        assert sorted(h.id for h in row) == sorted(point_ids)
        assert all(h.payload["label"] == h.id for h in row)
        for hit in row:
            assert hit.score == pytest.approx(float(query_vector @ by_id[hit.id]), abs=1e-5)

    by_id.update({point_ids[0]: rewritten[0], added: rewritten[1]})
    del by_id[point_ids[1]]
    now = list(by_id)
    assert [row[0].id for row in after] == expected_ids(
        now, np.stack(list(by_id.values())), queries
    )
    assert all(sorted(h.id for h in row) == sorted(now) for row in after)


@pytest.mark.asyncio(loop_scope="function")
async def test_queries_asked_while_a_write_waits_wait_for_it(tmp_path: Path) -> None:
    """Writers first: a large query asked while a write waits for another query does not start
    before the write has landed, and sees it; so a stream of queries cannot starve a write."""
    with query_gate() as gate:
        store, _, vectors = await gated_store(tmp_path, load=False)
        added = str(uuid.uuid4())
        payload = read_payload({"classifier": "c", "id": added, "label": added})
        try:
            first = asyncio.create_task(store.query(4, "c", large(-vectors[:1]), 50))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            write = asyncio.create_task(store.upsert(4, [added], -vectors[:1], [payload]))
            second = asyncio.create_task(store.query(4, "c", large(-vectors[:1]), 50))
            assert await ran_meanwhile()
            assert not write.done()
            assert not second.done()
            assert len(gate.threads) == 1  # the second query has not started
            gate.release.set()
            before, after = await first, await second
            await write
        finally:
            await store.close()
    assert before[0][0].id != added
    assert after[0][0].id == added


@pytest.mark.asyncio(loop_scope="function")
async def test_a_large_query_whose_caller_leaves_holds_writes_until_its_thread_ends(
    tmp_path: Path,
) -> None:
    """A caller cancelled while its query runs in a worker thread leaves the thread running on
    the copy: a write waits for the thread, not for the caller, and the hold ends with the
    thread. A write cancelled while it waits leaves no hold on later queries either."""
    with query_gate() as gate:
        store, _, vectors = await gated_store(tmp_path, load=False)
        added = str(uuid.uuid4())
        payload = read_payload({"classifier": "c", "id": added, "label": added})
        try:
            query = asyncio.create_task(store.query(4, "c", large(vectors), 50))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            left = asyncio.create_task(store.upsert(4, [added], -vectors[:1], [payload]))
            assert await ran_meanwhile()
            left.cancel()
            query.cancel()
            write = asyncio.create_task(store.upsert(4, [added], -vectors[:1], [payload]))
            assert await ran_meanwhile()
            assert query.cancelled()
            assert not write.done()  # the query's thread still runs
            gate.release.set()
            await asyncio.wait_for(write, WAIT)
            newest = await asyncio.wait_for(store.query(4, "c", large(-vectors[:1]), 50), WAIT)
        finally:
            await store.close()
    assert newest[0][0].id == added


@pytest.mark.asyncio(loop_scope="function")
async def test_a_small_query_stays_on_the_event_loop(tmp_path: Path) -> None:
    """One Classify at a small copy costs less than a thread hop: it runs on the loop's
    thread, and once the copy is loaded it is answered without yielding to the loop."""
    with query_gate() as gate:
        store, point_ids, vectors = await gated_store(tmp_path, load=False)
        try:
            await store.query(4, "c", vectors[:1], 1)  # loads the copy
            call = store.query(4, "c", vectors[1:2], 1).__await__()
            with pytest.raises(StopIteration) as answered:
                next(call)  # one step, with no await that yields
        finally:
            await store.close()
    assert gate.threads == [threading.get_ident()] * 2
    assert answered.value.value[0][0].id == point_ids[1]


@pytest.mark.asyncio(loop_scope="function")
async def test_an_upserts_points_are_built_off_the_event_loop(tmp_path: Path) -> None:
    """An upsert of 1,024 points held the event loop for 60-120 ms of CPU, most of it building
    Edge's points (each one's vector and payload converted for Edge). While that is held at its
    gate in a worker thread, another task runs, the write is pending, and a query loads the copy
    meanwhile; the write then lands in that copy (it waits for a load, whenever that began)."""
    with CallGate(stored_payload.__code__) as gate:
        store = EdgeStore(tmp_path)
        await store.open([4])
        point_ids = [str(uuid.uuid4()) for _ in range(50)]
        vectors = unit(np.random.default_rng(5), 50, 4)
        payloads = [read_payload({"classifier": "c", "id": i, "label": i}) for i in point_ids]
        try:
            write = asyncio.create_task(store.upsert(4, point_ids, vectors, payloads))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)
            assert await ran_meanwhile()
            assert not write.done()
            before = await store.query(4, "c", vectors[:1], 1)  # loads the (empty) copy
            gate.release.set()
            await asyncio.wait_for(write, WAIT)
            after = await store.query(4, "c", vectors, 1)
        finally:
            await store.close()
    assert threading.get_ident() not in gate.threads
    assert before == [[]]
    assert [row[0].id for row in after] == point_ids


async def test_a_loaded_copy_holds_no_object_per_point_the_collector_tracks(
    tmp_path: Path,
) -> None:
    """Each full garbage collection visits every object the collector tracks, holding the GIL
    throughout: a copy's payloads were tracked (their metadata, a dict, could hold a cycle), one
    object per point of every loaded copy. Packed, they are not, so the objects tracked do not
    grow with the points a copy holds. What it answers still carries the metadata written, in
    payloads of the caller's own: changing one changes neither the copy nor later answers. A
    snapshot's payloads, without metadata (Store.vectors), hold no container, so the collector
    does not track them either while the snapshot is held."""
    count, dimension = 3_000, 8
    point_ids = [str(uuid.uuid4()) for _ in range(count)]
    vectors = unit(np.random.default_rng(2), count, dimension)
    payloads = [
        exemplar_payload(
            "c",
            str(i),
            f"l{i % 7}",
            f"t{i}",
            {"n": f"{i}", "clé": 'a "quoted" été'} if i % 2 else {},
            i,
            i % 3 == 0,
        )
        for i in range(count)
    ]
    written = dict(zip(point_ids, payloads, strict=True))
    store = EdgeStore(tmp_path)
    await store.open([dimension])
    try:
        warm_up = [exemplar_payload("w", "w", "w", "w", {}, 0)]
        await store.upsert(dimension, [str(uuid.uuid4())], vectors[:1], warm_up)
        await store.query(dimension, "w", vectors[:1], 1)  # the worker threads, started
        await store.upsert(dimension, point_ids, vectors, payloads)
        gc.collect()
        before = len(gc.get_objects())
        await store.query(dimension, "c", vectors[:1], 1)  # loads the copy
        gc.collect()
        grown = len(gc.get_objects()) - before
        hits = await store.query(dimension, "c", vectors[:8], 5)
        assert [row[0].id for row in hits] == point_ids[:8]
        assert all(h.payload == written[h.id] for row in hits for h in row)
        for row in hits:
            row[0].payload["metadata"]["n"] = "changed by a caller"
        again = await store.query(dimension, "c", vectors[:8], 5)
        records, _ = await store.vectors(dimension, "c")
    finally:
        await store.close()
    assert grown < count // 10
    assert all(h.payload == written[h.id] for row in again for h in row)
    assert {r.id: r.payload for r in records} == {
        point_id: {key: value for key, value in payload.items() if key != "metadata"}
        for point_id, payload in written.items()
    }
    assert not any(gc.is_tracked(record.payload) for record in records)
