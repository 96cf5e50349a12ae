"""Defects found by the fourth hostile review (docs/reliability.md), one regression test each."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
from pathlib import Path
from types import CodeType, FrameType

import pytest
from pydantic import ValidationError
from qdrant_client import AsyncQdrantClient

from knn_classifier.server.domain import ExemplarInput, NewClassifier
from knn_classifier.server.errors import Aborted, Reason, Unavailable
from knn_classifier.server.settings.store import StoreSettings
from knn_classifier.server.store import EdgeStore, Selection
from knn_classifier.server.store.schema import read_fields

from .conftest import make_settings
from .fake_embedder import FakeEmbeddingServer
from .test_leases import GatedStore, contents, two_replicas, until_done_or_set
from .test_mirror import WAIT, written_store


class WorkerGate:
    """A hook on calls of one function in threads other than the test's (a profile function,
    in threads started while it is open, such as the event loop's worker threads): the first
    such call waits until the test releases it. Tests using it run on an event loop of their
    own, whose worker threads start inside the gate."""

    def __init__(self, code: CodeType) -> None:
        self.code = code
        self.entered = threading.Event()
        self.release = threading.Event()
        self.opener = threading.get_ident()

    def __enter__(self) -> WorkerGate:
        threading.setprofile(self._profile)
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        threading.setprofile(None)

    def _profile(self, frame: FrameType, event: str, _: object) -> None:
        if (
            event == "call"
            and frame.f_code is self.code
            and not self.entered.is_set()
            and threading.get_ident() != self.opener
        ):
            self.entered.set()
            self.release.wait(WAIT)


@pytest.mark.asyncio(loop_scope="function")
async def test_a_store_closed_under_a_read_in_a_worker_thread_is_not_declared_damaged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The whole-classifier read of ``EdgeStore.vectors`` (Evaluate, CheckExemplars, export)
    scrolls the shard page by page in a worker thread. A service stopping closes the store
    under it: the read's next scroll fails. That failure was taken for a damaged shard: an
    ERROR log telling the operator to restore the data directory from a backup, and the store
    object out of service for good (opened again, it refused every call). It must fail the
    read alone (UNAVAILABLE), log no error, and leave the store usable once opened again."""
    store = EdgeStore(tmp_path)
    try:
        with WorkerGate(read_fields.__code__) as gate:
            # Inside the gate: its upserts start the loop's worker threads.
            await written_store(tmp_path, 1_500, 4)  # two scroll pages
            await store.open([4])
            reading = asyncio.create_task(store.vectors(4, "c"))
            assert await asyncio.to_thread(gate.entered.wait, WAIT)  # within the first page
            await store.close()
            gate.release.set()
            with pytest.raises(Unavailable) as failed:
                await reading
        assert "damaged" not in failed.value.message
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
        await store.open([4])
        records, _ = await store.vectors(4, "c")
        assert len(records) == 1_500
    finally:
        await store.close()


@pytest.mark.parametrize(
    "command",
    [["knn_classifier.server"], ["knn_classifier.server.migrate", "--from-data-dir", "/nowhere"]],
    ids=["server", "migrate"],
)
def test_a_nested_setting_that_is_not_json_is_one_line_not_a_traceback(
    command: list[str],
) -> None:
    """A nested setting given whole as JSON (``KNN_EMBEDDING='{...}'``) that does not parse
    raised pydantic-settings' SettingsError, which is no ValidationError: start-up printed a
    traceback instead of the one line per problem that settings/invalid.py prints."""
    env = {"KNN_EMBEDDING": '{"api_key": "sk-secret-value", oops', "PATH": "/usr/bin:/bin"}
    result = subprocess.run(
        [sys.executable, "-m", *command], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "sk-secret-value" not in result.stderr
    assert "invalid settings" in result.stderr
    assert "KNN_EMBEDDING" in result.stderr


def test_a_write_lease_no_longer_than_two_store_calls_is_refused() -> None:
    """The lease's guarantee rests on every store write ending within the lease: a write starts
    with half a lease left, and a Qdrant call may take store.timeout_s. A lease of 10 s beside
    the default timeout of 10 s was accepted, its guarantee silently void."""
    with pytest.raises(ValidationError) as refused:
        StoreSettings(url="http://qdrant:6333", write_lease_s=10)
    assert "store.write_lease_s=10 must be more than twice store.timeout_s=10" in str(refused)
    StoreSettings(url="http://qdrant:6333", write_lease_s=21)
    StoreSettings(write_lease_s=0.1)  # the embedded store takes no lease


async def test_a_conditional_write_that_waited_for_the_lease_is_refused_if_the_etag_moved(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Replica B's DeleteExemplars, conditional on the etag it read, finds the lease held by
    replica A's AddExemplars and waits. B's etag was checked before the wait only, so once A's
    add moved the revision, B's delete went ahead on a classifier changed since its etag and
    was acknowledged. It must answer ABORTED (the etag is stale) and delete nothing."""
    settings = make_settings(tmp_path, fake_embedder.base_url)
    store_a = GatedStore(AsyncQdrantClient(":memory:"), before=settings.dimensions[-1])
    replica_a, replica_b, store_b = await two_replicas(settings, store_a)
    try:
        await replica_a.create_classifier(NewClassifier("c"))
        await replica_a.add_exemplars("c", [ExemplarInput("old words", "a", id="old")])
        read = (await replica_b.get_classifier("c")).config.etag
        store_a.hold.clear()
        adding = asyncio.create_task(
            replica_a.add_exemplars("c", [ExemplarInput("new words", "a", id="new")])
        )
        await store_a.holding.wait()  # A holds the lease, its write half done
        deleting = asyncio.create_task(replica_b.delete_exemplars("c", label="a", etag=read))
        await until_done_or_set(deleting, store_b.saw_lease_held)
        store_a.hold.set()
        await adding
        with pytest.raises(Aborted) as refused:
            await deleting
        assert refused.value.reason is Reason.ETAG_MISMATCH
        assert await contents(store_b, settings) == {16: {"old", "new"}, 64: {"old", "new"}}
    finally:
        await replica_a.stop()
        await replica_b.stop()


class DeleteGatedStore(GatedStore):
    """:class:`GatedStore` whose deletes of dimension ``after`` also wait, once applied."""

    async def delete(self, dimension: int, selection: Selection) -> None:
        await super().delete(dimension, selection)
        if dimension == self.after:
            await self._gate()


async def test_a_delete_done_again_after_losing_its_lease_counts_and_moves_the_revision(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    """Replica A (lease of 0.3 s) deletes label "a" and stalls after the first dimension; its
    lease runs out and replica B takes it for an add. A finds its lease lost and does the delete
    again; the first dimension holds none of the label any more, so the redo counted 0: A
    answered "0 deleted" for the two exemplars its call removed, and, counting nothing, released
    the lease without moving the revision, though the redo removed them from the last
    dimension (every replica's label models stayed fitted to them at B's revision)."""
    settings_a = make_settings(tmp_path, fake_embedder.base_url, store={"write_lease_s": 0.3})
    settings_b = make_settings(tmp_path, fake_embedder.base_url)
    first, last = settings_a.dimensions[0], settings_a.dimensions[-1]
    store_a = DeleteGatedStore(AsyncQdrantClient(":memory:"), after=first)
    replica_a, replica_b, store_b = await two_replicas(settings_a, store_a, settings_b)
    try:
        await replica_a.create_classifier(NewClassifier("c"))
        await replica_a.add_exemplars(
            "c",
            [
                ExemplarInput("one word", "a", id="a1"),
                ExemplarInput("two words", "a", id="a2"),
                ExemplarInput("bee words", "b", id="b1"),
            ],
        )
        store_a.hold.clear()
        deleting = asyncio.create_task(replica_a.delete_exemplars("c", label="a"))
        await store_a.holding.wait()  # label "a" gone from the first dimension only
        _, added_etag = await replica_b.add_exemplars("c", [ExemplarInput("bee too", "b", id="b2")])
        store_a.hold.set()
        deleted, deleted_etag = await deleting
        assert await contents(store_b, settings_a) == {first: {"b1", "b2"}, last: {"b1", "b2"}}
        assert deleted == 2
        current = (await replica_b.get_classifier("c")).config
        assert current.etag == deleted_etag != added_etag
    finally:
        await replica_a.stop()
        await replica_b.stop()
