"""The classifiers repository: the one writer of classifier records.

Every change to a classifier goes through here: creation, settings (UpdateClassifier, Evaluate's
apply_best), deletion, and every write of its exemplars, which bumps the record's revision.

Guarantees (docs/design.md, "Classifier records"):
- Within one process, writes to one classifier are serialised by a lock per name, and each
  re-reads the record under the lock: a writer that started on a classifier since deleted (or
  deleted and created again: a new ``uid``) fails with NOT_FOUND instead of writing; a
  conditional writer whose revision is stale fails with ABORTED.
- Across replicas sharing a Qdrant server, every change of an existing record is a
  compare-and-set on its revision (:meth:`Store.update_meta`): a replica never overwrites a
  change made since it read the record, nor brings back a record another deleted. Writes of
  exemplars also hold the classifier's write lease (:mod:`leases`), taken under the lock, so
  one replica at a time writes them; the write's last bump checks and releases it.
  An exemplar write moves the revision after writing its points (:meth:`Classifiers.bump`) and
  removes them again if the classifier is gone or is another incarnation; a delete marks the
  record ``deleting`` before it deletes the exemplars and removes the record last.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from . import deadlines, errors, validation
from .domain import ClassifierConfig, classifier_key
from .errors import Aborted, AlreadyExists, NotFound, Reason
from .leases import Lease, Leases, check_not_lost, lease_fields
from .store import Store

log = logging.getLogger(__name__)


class Classifiers:
    """``write_lease_s``: how long a write lease lasts on a store other processes share; None:
    no leases (for a reader, such as the migration's source)."""

    def __init__(self, store: Store, write_lease_s: float | None = None) -> None:
        self._store = store
        self._leases = Leases(store, write_lease_s) if store.shared and write_lease_s else None
        self._held: dict[str, Lease] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._holders: dict[str, int] = {}
        self._parsed: dict[str, tuple[dict[str, Any], ClassifierConfig]] = {}

    async def get(self, name: str, field: str = "classifier", etag: str = "") -> ClassifierConfig:
        """The classifier's record; NOT_FOUND if there is none or it is being deleted, ABORTED
        if ``etag`` is given and not its current one. ``field`` names the request field that
        holds the name, for errors."""
        return await self._current(name, None, etag, field)

    async def all(self) -> list[ClassifierConfig]:
        """Every classifier not being deleted, by name."""
        return sorted((c for c in await self._records() if not c.deleting), key=lambda c: c.name)

    async def deleting(self) -> list[ClassifierConfig]:
        """Classifiers whose deletion was interrupted (start-up finishes them)."""
        return [c for c in await self._records() if c.deleting]

    async def create(self, config: ClassifierConfig) -> ClassifierConfig:
        """Stores a new classifier with a fresh incarnation; ALREADY_EXISTS if the name is taken."""
        async with self._locked(config.name):
            current = await self._read(config.name)
            if current is not None:
                if current.deleting:
                    raise Aborted(
                        f"classifier {config.name!r} is being deleted; if no delete is running, "
                        "call DeleteClassifier again to finish it, then create it",
                        resource=errors.classifier(config.name),
                    )
                raise AlreadyExists(
                    f"classifier {config.name!r} already exists",
                    resource=errors.classifier(config.name),
                )
            created = dataclasses.replace(config, uid=uuid.uuid4().hex, revision=1)
            await self._write(created)
            # As the store gives it back (a float may come back one ulp off, e.g. created_at),
            # so that CreateClassifier answers what every GetClassifier will.
            stored = await self._read(config.name)
        log.info("created classifier %s", config.name)
        return stored if stored is not None and stored.uid == created.uid else created

    async def update(
        self,
        name: str,
        change: Callable[[ClassifierConfig], ClassifierConfig],
        *,
        uid: str | None = None,
        etag: str = "",
        field: str = "classifier",
    ) -> ClassifierConfig:
        """Applies ``change`` to the current record and bumps its revision.

        ``uid``: the incarnation the caller read (NOT_FOUND if it is gone); ``etag``: the exact
        revision the caller's change is based on (ABORTED if the record moved on since).
        """
        async with self._locked(name):
            current = await self._current(name, uid, etag, field)
            updated = dataclasses.replace(
                change(current),
                name=current.name,
                uid=current.uid,
                created_at=current.created_at,
                revision=current.revision,
                deleting=False,
                holds_negatives=current.holds_negatives,
            )
            written = await self._compare_and_set(current, updated.to_payload())
            if written is None:  # another replica wrote or deleted it since it was read
                await self._current(name, uid, "", field)  # NOT_FOUND if deleted
                raise Aborted(
                    f"classifier {name!r} was changed by another call at the same time; read "
                    "it again and retry",
                    reason=Reason.CONCURRENT_CHANGE,
                    resource=errors.classifier(name),
                )
        return written

    @asynccontextmanager
    async def writing(
        self, name: str, *, uid: str | None = None, etag: str = ""
    ) -> AsyncIterator[ClassifierConfig]:
        """Holds the classifier's write lock, and on a shared store its write lease, around a
        change of its exemplars.

        Yields the current record, checked against ``uid`` and ``etag`` as in :meth:`update`.
        The caller writes its points, calling :meth:`keep_lease` before each store write, then
        calls :meth:`bump` before leaving, which releases the lease. Leaving without a bump
        releases it too; LeaseLost if another replica took it meanwhile (the write must then be
        done again: :func:`leases.redone_if_lease_lost`).
        """
        async with self._locked(name):
            # The write runs on when its caller leaves (completion.completed), but one that only
            # got the lock after its caller's deadline must not start: that caller was told
            # DEADLINE_EXCEEDED. A write done again (leases.redone_if_lease_lost) has no deadline.
            deadlines.check("the write could start (other writes to the classifier held it)")
            current = await self._current(name, uid, etag, "classifier")
            if self._leases is None:
                yield current
                return
            seen = self._parsed.get(current.name)  # the record _current just read
            lease = self._held[name] = await self._leases.take(current, seen and seen[0])
            try:
                if etag:  # again: another replica's write may have moved it while this one waited
                    current = await self._current(name, uid, etag, "classifier")
                yield current
            except BaseException:
                if not lease.released:
                    await self._leases.release_quietly(current, lease)
                raise
            else:
                if not lease.released:
                    await self._leases.release(current, lease)
            finally:
                del self._held[name]

    async def keep_lease(self, name: str) -> None:
        """Before a store write under :meth:`writing`: extends this replica's lease on ``name``
        if half of it is gone; LeaseLost if it has run out or another replica took it."""
        lease = self._held.get(name)
        if lease is not None and self._leases is not None:
            await self._leases.renewed(lease)

    async def bump(
        self,
        config: ClassifierConfig,
        *,
        holds_negatives: bool | None = None,
        keep_lease: bool = False,
    ) -> ClassifierConfig:
        """Records that ``config``'s exemplars changed: re-reads the record and bumps its
        revision. NOT_FOUND if the classifier was deleted or re-created meanwhile (possible
        across replicas only): the caller must then remove what it wrote. Under a write lease,
        the bump happens only if the lease is still this replica's (LeaseLost if not), and
        releases it unless ``keep_lease`` (a bump before the points are written).

        ``holds_negatives`` True sets the record's mark (:attr:`ClassifierConfig.holds_negatives`);
        False clears it only if the record is still at ``config``'s revision, since a write of
        another replica since then may have added negatives."""
        lease = self._held.get(config.name)
        for _ in range(_ATTEMPTS):
            current = await self._read(config.name)
            if current is None or current.deleting or current.uid != config.uid:
                if lease is not None:
                    lease.released = True  # gone with the record
                raise NotFound(
                    f"classifier {config.name!r} was deleted during the write",
                    resource=errors.classifier(config.name),
                )
            mark = holds_negatives
            if mark is False and current.revision != config.revision:
                mark = None
            fields = {} if mark is None else {"holds_negatives": mark}
            bumped = await self._compare_and_set(current, fields, lease, release=not keep_lease)
            if bumped is not None:
                if lease is not None and not keep_lease:
                    lease.released = True
                return bumped
        raise _contended(config.name)

    @asynccontextmanager
    async def deleting_classifier(
        self, name: str, *, etag: str = ""
    ) -> AsyncIterator[ClassifierConfig]:
        """Marks the classifier ``deleting`` for the caller to delete its exemplars, then
        removes the record. If the body fails, the mark stays: the classifier answers NOT_FOUND
        and start-up (or deleting it again) finishes the job."""
        async with self._locked(name):
            config = await self._read(validation.classifier_name(name, "name"))
            if config is None:
                raise _not_found(name)
            if etag and not config.deleting and config.etag != etag:
                raise _stale(name, etag, config)
            marked = await self._mark_deleting(config)
            yield marked
            await self._store.delete_meta(classifier_key(config.name))

    # Internals -------------------------------------------------------------------------------

    async def _records(self) -> list[ClassifierConfig]:
        return [ClassifierConfig.from_payload(p) for p in await self._store.list_meta("classifier")]

    async def _read(self, name: str) -> ClassifierConfig | None:
        """The record as the store has it now (every call reads it), parsed again only when
        it differs from the one parsed last for ``name``: every Classify reads its record."""
        payload = await self._store.get_meta(classifier_key(name))
        if payload is None:
            return None
        parsed = self._parsed.get(name)
        if parsed is not None and parsed[0] == payload:
            return parsed[1]
        config = ClassifierConfig.from_payload(payload)
        if len(self._parsed) >= _PARSED_RECORDS:
            self._parsed.clear()
        self._parsed[name] = (payload, config)
        return config

    async def _mark_deleting(self, config: ClassifierConfig) -> ClassifierConfig:
        """Sets the record's ``deleting`` mark, whatever other replicas write meanwhile."""
        for _ in range(_ATTEMPTS):
            if config.deleting:
                return config
            marked = await self._compare_and_set(config, {"deleting": True})
            if marked is not None:
                return marked
            again = await self._read(config.name)
            if again is None:
                raise _not_found(config.name)
            config = again
        raise _contended(config.name)

    async def _compare_and_set(
        self,
        current: ClassifierConfig,
        fields: dict[str, Any],
        lease: Lease | None = None,
        *,
        release: bool = False,
    ) -> ClassifierConfig | None:
        """Writes ``fields`` and the next revision on ``current``'s record if it is still at
        ``current``'s revision (and incarnation, and deletion state, and with ``lease``: still
        held by it) when the store applies the write; returns the record written, or None if
        another write came first; LeaseLost if another replica took ``lease``. ``release``
        releases ``lease`` in the same write. A random ``writer`` token read back tells this
        write from a competing one of the same revision.
        """
        token = uuid.uuid4().hex
        held, released = lease_fields(lease)
        where: dict[str, Any] = {"revision": current.revision, "deleting": current.deleting}
        if current.uid:
            where["uid"] = current.uid
        key = classifier_key(current.name)
        changes = {**fields, "revision": current.revision + 1, "writer": token}
        if release:
            changes.update(released)
        await self._store.update_meta(key, changes, {**where, **held})
        after = await self._store.get_meta(key)
        if after is None or after.get("writer") != token:
            check_not_lost(lease, current, after)
            return None
        return ClassifierConfig.from_payload(after)

    async def upgrade(self) -> int:
        """Gives records written before revisions their fields (revision 0, not deleting), so
        that conditional writes can match them; returns how many were rewritten."""
        old = [
            ClassifierConfig.from_payload(payload)
            for payload in await self._store.list_meta("classifier")
            if "revision" not in payload or "deleting" not in payload
        ]
        for config in old:
            await self._write(config)
        return len(old)

    async def _write(self, config: ClassifierConfig) -> None:
        await self._store.put_meta(classifier_key(config.name), config.to_payload())

    async def _current(self, name: str, uid: str | None, etag: str, field: str) -> ClassifierConfig:
        current = await self._read(validation.classifier_name(name, field))
        if current is None or current.deleting or (uid is not None and current.uid != uid):
            raise _not_found(name)
        if etag and current.etag != etag:
            raise _stale(name, etag, current)
        return current

    @asynccontextmanager
    async def _locked(self, name: str) -> AsyncIterator[None]:
        """The per-name lock, dropped from the table when its last holder leaves."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        self._holders[name] = self._holders.get(name, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._holders[name] -= 1
            if not self._holders[name]:
                del self._holders[name]
                del self._locks[name]


_ATTEMPTS = 100
"""Conditional writes tried before giving up on a record other replicas keep changing."""
_PARSED_RECORDS = 4096
"""Parsed records kept (the last of each name read); all are dropped when the table is full."""


def _contended(name: str) -> Aborted:
    return Aborted(
        f"classifier {name!r} is being changed by other calls; retry",
        reason=Reason.CONCURRENT_CHANGE,
        resource=errors.classifier(name),
    )


def _stale(name: str, etag: str, current: ClassifierConfig) -> Aborted:
    """The error of a conditional write whose ``etag`` is not ``current``'s."""
    return Aborted(
        f"classifier {name!r} changed since etag {etag!r} (now {current.etag!r}); "
        "read it again and retry",
        reason=Reason.ETAG_MISMATCH,
        resource=errors.classifier(name),
        metadata={"etag": current.etag},
    )


def _not_found(name: str) -> NotFound:
    return NotFound(f"classifier {name!r} does not exist", resource=errors.classifier(name))
