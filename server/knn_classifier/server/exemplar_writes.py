"""The exemplar write path: AddExemplars, DeleteExemplars and the migration's restore.

Every write runs under its classifier's write lock on the record as it is then (re-read, so a
classifier deleted or re-created meanwhile is not written), and on a store other replicas share
under its write lease (done again if another replica took the lease meanwhile: ``leases.py``);
it goes to every dimension or (best effort) to none, moves the classifier's revision, and runs
to completion even when its caller is cancelled.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence

from . import errors, transfer, validation
from .classification import embed_isolating_rejects
from .classifiers import Classifiers
from .completion import completed
from .domain import ClassifierConfig, Exemplar, ExemplarInput
from .embedding_pipeline import EmbeddingPipeline
from .errors import InvalidArgument, NotFound, Reason, ResourceExhausted, Unavailable
from .leases import redone_if_lease_lost
from .settings import Settings
from .store import Selection, Store
from .store.schema import ExemplarPayload, exemplar_payload
from .transfer import VectorSet
from .vectors import Matrix

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("0f4a6c1e-2b7d-4e58-9a31-6c8e2d5b7f90")


def derived_exemplar_id(classifier: str, text: str) -> str:
    """The id of an exemplar added without one: adding the same text again updates it."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"text\x00{classifier}\x00{text}"))


def _point_id(classifier: ClassifierConfig, exemplar_id: str) -> str:
    """The store's point id: exemplar ids are per classifier, point ids are global UUIDs.

    The classifier's incarnation is part of it, so a classifier created again under an old name
    can never share a point with the old one (records from before incarnations have none)."""
    incarnation = f"\x00{classifier.uid}" if classifier.uid else ""
    key = f"point\x00{classifier.name}\x00{exemplar_id}{incarnation}"
    return str(uuid.uuid5(_ID_NAMESPACE, key))


class ExemplarWrites:
    """Writes and deletes a classifier's exemplars in every dimension of the store."""

    def __init__(
        self,
        settings: Settings,
        embedder: EmbeddingPipeline,
        store: Store,
        classifiers: Classifiers,
    ) -> None:
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store
        self._classifiers = classifiers

    async def add_exemplars(
        self,
        classifier: str,
        items: Sequence[ExemplarInput],
        etag: str = "",
        embedder_fingerprint: str = "",
    ) -> tuple[list[str], str]:
        """Embeds ``items`` once and writes them to every dimension; returns their ids and the
        classifier's etag after the write.

        The embedding call may take long and the classifier may change meanwhile, so the write
        happens under the classifier's write lock, on the record as it is then: deleted or
        re-created since, the add fails with NOT_FOUND and writes nothing. Items given with
        vectors (and ``embedder_fingerprint``) are stored without an embedding call.
        """
        validation.batch_size(len(items), self._limits, "exemplars")
        for i, item in enumerate(items):
            validation.text(item.text, self._limits, f"exemplars[{i}].text")
            if item.label or not item.out_of_scope:  # a negative's topic label is optional
                validation.label(item.label, f"exemplars[{i}].label")
            validation.exemplar_id(item.id, f"exemplars[{i}].id")
            validation.metadata(item.metadata, f"exemplars[{i}].metadata")
        given = transfer.given_vectors(
            items, embedder_fingerprint, self._embedder.fingerprint, self._dimensions
        )
        config = await self._classifiers.get(classifier)

        ids = [item.id or derived_exemplar_id(classifier, item.text) for item in items]
        # A repeated id within the batch: the last occurrence wins, as it would across calls.
        latest = {exemplar_id: i for i, exemplar_id in enumerate(ids)}
        chosen = sorted(latest.values())
        if len(chosen) > self._limits.max_exemplars_per_classifier:
            raise self._limit_reached(classifier, 0, len(chosen))
        if given is None:
            prompts = [self._embedder.prompt(config.instruction, items[i].text) for i in chosen]
            vectors = VectorSet.of(await self._embedder.bulk.embed(prompts))
        else:
            vectors = given.rows(chosen)
        written = await completed(
            redone_if_lease_lost(
                lambda etag: self._write_locked(
                    classifier, config.uid, etag, items, ids, chosen, vectors
                ),
                etag,
            )
        )
        return ids, written.etag

    async def _write_locked(
        self,
        classifier: str,
        uid: str,
        etag: str,
        items: Sequence[ExemplarInput],
        ids: list[str],
        chosen: list[int],
        vectors: VectorSet,
    ) -> ClassifierConfig:
        """AddExemplars' write, under the classifier's lock; returns the record after it."""
        async with self._classifiers.writing(classifier, uid=uid, etag=etag) as current:
            now = time.time()
            point_ids = [_point_id(current, ids[i]) for i in chosen]
            payloads = [
                exemplar_payload(
                    classifier,
                    ids[i],
                    items[i].label,
                    items[i].text,
                    items[i].metadata,
                    now,
                    items[i].out_of_scope,
                )
                for i in chosen
            ]
            created = await self._absent(classifier, point_ids)
            await self._check_room(classifier, len(created))
            current = await self._marked_for_negatives(current, payloads)
            await self._write_everywhere(current, point_ids, created, vectors, payloads)
            try:
                return await self._classifiers.bump(
                    current, holds_negatives=_holds_negatives(payloads)
                )
            except NotFound:
                await self.delete(Selection(classifier, ids=point_ids))
                raise

    async def restore_exemplars(
        self, config: ClassifierConfig, exemplars: Sequence[Exemplar], vectors: Matrix | None
    ) -> tuple[int, int]:
        """The migration's copy of exemplars from another store, with their ids, texts, labels,
        metadata and creation times; returns how many were written and how many embedded.

        An exemplar the classifier already holds in every dimension with the same payload is
        skipped, so a migration run again continues where it stopped. ``vectors``: one row per
        exemplar, made by this service's embedder and at least as wide as every dimension; None:
        the texts are embedded (InvalidArgument naming the exemplar if the model rejects one).
        Written as AddExemplars writes: under the write lock, within the exemplar limit, in
        every dimension, with the revision bumped.
        """
        point_ids = [_point_id(config, e.id) for e in exemplars]
        payloads = [
            exemplar_payload(
                config.name, e.id, e.label, e.text, e.metadata, e.created_at, e.out_of_scope
            )
            for e in exemplars
        ]
        held = await self._held_everywhere(config.name, point_ids)
        todo = [i for i, point in enumerate(point_ids) if held.get(point) != payloads[i]]
        if not todo:
            return 0, 0
        if vectors is None:
            prompts = [self._embedder.prompt(config.instruction, exemplars[i].text) for i in todo]
            _, written, rejected = await embed_isolating_rejects(self._embedder.bulk, prompts)
            if rejected:
                j, rejection = min(rejected.items())
                raise InvalidArgument(
                    f"exemplar {exemplars[todo[j]].id!r} of classifier {config.name!r}: "
                    f"{rejection.message}",
                    reason=rejection.reason,
                )
        else:
            written = vectors[todo]
        ids = [point_ids[i] for i in todo]
        payloads = [payloads[i] for i in todo]
        await completed(
            redone_if_lease_lost(
                lambda _: self._restore_locked(config, ids, VectorSet.of(written), payloads), ""
            )
        )
        return len(todo), len(todo) if vectors is None else 0

    async def _restore_locked(
        self,
        config: ClassifierConfig,
        point_ids: list[str],
        vectors: VectorSet,
        payloads: list[ExemplarPayload],
    ) -> None:
        """restore_exemplars' write, under the classifier's lock."""
        async with self._classifiers.writing(config.name, uid=config.uid) as current:
            created = await self._absent(config.name, point_ids)
            await self._check_room(config.name, len(created))
            current = await self._marked_for_negatives(current, payloads)
            await self._write_everywhere(current, point_ids, created, vectors, payloads)
            await self._classifiers.bump(current, holds_negatives=_holds_negatives(payloads))

    async def _marked_for_negatives(
        self, config: ClassifierConfig, payloads: Sequence[ExemplarPayload]
    ) -> ClassifierConfig:
        """The record, marked as holding negative exemplars if ``payloads`` has one and it was
        not yet: before the points are written, so that no Classify ever lets a negative vote
        (Classify keeps negatives out of the vote only for records with the mark)."""
        if config.holds_negatives or not _holds_negatives(payloads):
            return config
        return await self._classifiers.bump(config, holds_negatives=True, keep_lease=True)

    async def _held_everywhere(
        self, classifier: str, point_ids: list[str]
    ) -> dict[str, ExemplarPayload]:
        """The payloads of those of ``point_ids`` that every dimension holds."""
        held: dict[str, ExemplarPayload] | None = None
        for dimension in self._dimensions:
            records, _ = await self._store.scroll(
                dimension, Selection(classifier, ids=point_ids), len(point_ids), None
            )
            here = {record.id: record.payload for record in records}
            held = here if held is None else {p: v for p, v in held.items() if p in here}
        return held or {}

    async def _absent(self, classifier: str, point_ids: list[str]) -> list[str]:
        """Which of ``point_ids`` the classifier does not hold yet."""
        existing, _ = await self._store.scroll(
            self._dimensions[0], Selection(classifier, ids=point_ids), len(point_ids), None
        )
        return sorted(set(point_ids) - {record.id for record in existing})

    async def _write_everywhere(
        self,
        config: ClassifierConfig,
        point_ids: list[str],
        created: list[str],
        vectors: VectorSet,
        payloads: list[ExemplarPayload],
    ) -> None:
        """Writes the points to every dimension, or (best effort) to none.

        If a dimension fails, the ``created`` points (new with this call) are deleted again
        from the dimensions already written, so no new exemplar is left half-present. Points
        that existed before keep the new version where it was written. If the rollback itself
        fails, start-up repair completes the leftovers in every dimension instead. Either way the
        revision moves, so no replica keeps a model fitted while the failed write was visible.
        """
        classifier = config.name
        written: list[int] = []
        try:
            for dimension in self._dimensions:
                await self._classifiers.keep_lease(classifier)
                await self._store.upsert(dimension, point_ids, vectors.at(dimension), payloads)
                written.append(dimension)
        except (Unavailable, ResourceExhausted):
            if created:
                try:
                    for dimension in written:
                        await self._store.delete(dimension, Selection(classifier, ids=created))
                except (Unavailable, ResourceExhausted):
                    log.warning(
                        "rollback of %d new exemplars failed; repair at start-up", len(created)
                    )
            if written:
                await self._bump_after_failure(config)
            raise

    async def _bump_after_failure(self, config: ClassifierConfig) -> None:
        """Best effort: the store that just failed may refuse this too."""
        try:
            await self._classifiers.bump(config)
        except errors.ServiceError as exc:
            log.warning(
                "classifier %s: revision not moved after a failed write: %s", config.name, exc
            )

    async def _check_room(self, classifier: str, adding: int) -> None:
        """Refuses new exemplars that would take the classifier past its exemplar limit.

        Runs under the classifier's write lock with ``adding`` the points that are new, so within
        one process the limit is never passed.
        """
        held = await self.count(Selection(classifier))
        if held + adding > self._limits.max_exemplars_per_classifier:
            raise self._limit_reached(classifier, held, adding)

    def _limit_reached(self, classifier: str, held: int, adding: int) -> ResourceExhausted:
        limit = self._limits.max_exemplars_per_classifier
        return ResourceExhausted(
            f"classifier {classifier!r} holds {held} exemplars; adding {adding} new ones would "
            f"pass the limit of {limit} exemplars per classifier",
            reason=Reason.EXEMPLAR_LIMIT_REACHED,
            metadata={"limit": limit, "held": held, "adding": adding},
        )

    async def delete_exemplars(
        self,
        classifier: str,
        ids: Sequence[str] = (),
        label: str = "",
        etag: str = "",
        out_of_scope: bool | None = None,
    ) -> tuple[int, str]:
        """Deletes exemplars by ids or by label, of those with ``out_of_scope`` set only the
        negative exemplars (True) or only the others (False); or, with neither ids nor a label,
        every exemplar of that scope. Returns how many and the classifier's etag."""
        if ids and label:
            raise InvalidArgument(
                "give either ids or a label, not both",
                reason=Reason.FIELD_REQUIRED,
                field="selector",
            )
        if not ids and not label and out_of_scope is None:
            raise InvalidArgument(
                "give either ids or a label, or a scope (in scope or out of scope) to delete "
                "every exemplar of; DeleteClassifier deletes them all",
                reason=Reason.FIELD_REQUIRED,
                field="selector",
            )
        if ids:
            validation.batch_size(len(ids), self._limits, "ids")
            for i, exemplar_id in enumerate(ids):
                if not exemplar_id:
                    raise InvalidArgument(
                        f"ids.ids[{i}] is empty",
                        reason=Reason.FIELD_REQUIRED,
                        field=f"ids.ids[{i}]",
                    )
                validation.exemplar_id(exemplar_id, f"ids.ids[{i}]")
        elif label:
            validation.label(label)
        counts: list[int] = []  # each attempt's, should it be done again
        return await completed(
            redone_if_lease_lost(
                lambda etag: self._delete_locked(
                    classifier, ids, label, etag, out_of_scope, counts
                ),
                etag,
            )
        )

    async def _delete_locked(
        self,
        classifier: str,
        ids: Sequence[str],
        label: str,
        etag: str,
        out_of_scope: bool | None,
        counts: list[int],
    ) -> tuple[int, str]:
        """DeleteExemplars under the classifier's lock; the revision moves only if something
        was deleted, so a delete of nothing fails nobody's conditional write. ``counts``: what
        earlier attempts counted, if this one does the delete again after a lost lease: they may
        have removed those exemplars from some dimensions already, so it counts them too (and
        moves the revision for them)."""
        async with self._classifiers.writing(classifier, etag=etag) as current:
            selection = Selection(
                current.name,
                ids=[_point_id(current, exemplar_id) for exemplar_id in ids] if ids else None,
                label=label or None,
                out_of_scope=out_of_scope,
            )
            counts.append(await self.count(selection))
            await self._delete_everywhere(selection)
            deleted = max(counts)
            if not deleted:
                return 0, current.etag
            holds_negatives = None
            if current.holds_negatives:
                negatives = Selection(current.name, out_of_scope=True)
                holds_negatives = await self.count(negatives) > 0
            written = await self._classifiers.bump(current, holds_negatives=holds_negatives)
        return deleted, written.etag

    async def delete(self, selection: Selection) -> int:
        """Deletes the selected exemplars from every dimension; returns how many there were."""
        count = await self.count(selection)
        await self._delete_everywhere(selection)
        return count

    async def _delete_everywhere(self, selection: Selection) -> None:
        for dimension in self._dimensions:
            await self._classifiers.keep_lease(selection.classifier)
            await self._store.delete(dimension, selection)

    async def count(self, selection: Selection) -> int:
        """How many exemplars ``selection`` holds: counted in one dimension, since every write
        goes to every dimension."""
        return await self._store.count(self._dimensions[0], selection)


def _holds_negatives(payloads: Sequence[ExemplarPayload]) -> bool | None:
    """True (mark the record) if ``payloads`` has a negative exemplar, else None (leave the
    mark). The write's last bump marks the record again: another replica's delete may have
    cleared the mark, counting no negative, while these were being written."""
    return True if any(p["out_of_scope"] for p in payloads) else None
