"""The transport-free core: classifiers, exemplars and classification over an embedder and a store.

Knows nothing of gRPC: it takes and returns domain types and raises the errors of ``errors``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
import uuid
from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

from . import errors, label_models, out_of_scope, paging, tracing, updates, validation, wire_size
from .classifiers import Classifiers
from .coalescing import Coalescer, QueryBatcher
from .domain import (
    ClassifierConfig,
    ClassifierInfo,
    ClassifierUpdate,
    ClassifyOptions,
    EvaluateRequest,
    Exemplar,
    ExemplarInput,
    NewClassifier,
    ServiceInfo,
)
from .embedding import Embedder, Fingerprint, Matrix, truncate
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    StartupError,
    Unavailable,
)
from .evaluator import Evaluation, Evaluator
from .metrics import Metrics
from .progress import Progress
from .settings import LimitSettings, Settings
from .store import Record, Selection, Store
from .store.base import Payload
from .voting import Neighbour, ScopeCheck, Vote, Voting, vote

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("0f4a6c1e-2b7d-4e58-9a31-6c8e2d5b7f90")
FINGERPRINT_KEY = "embedder-fingerprint"
_REPAIR_BATCH = 512
"""Exemplars read, embedded and written together by the start-up repair."""
MIGRATION_HINT = (
    "move the data to this embedder: copy it into a new store with knn-classifier-migrate "
    "(README, 'Moving to another embedder')"
)

T = TypeVar("T")


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


class ClassifierService:
    def __init__(
        self, settings: Settings, embedder: Embedder, store: Store, metrics: Metrics | None = None
    ) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store
        self._classifiers = Classifiers(store)
        self._evaluator = Evaluator(settings, embedder, store)
        self._coalescer = Coalescer(
            embedder.embed_uncached,
            settings.embedding.max_texts_per_call,
            settings.embedding.max_concurrent_calls,
            settings.limits.max_queued_texts,
            settings.embedding.max_wait_ms / 1000,
            metrics,
        )
        self._queries = QueryBatcher(store, metrics)

    @property
    def limits(self) -> LimitSettings:
        return self._limits

    @property
    def fingerprint(self) -> Fingerprint:
        """The embedder's, once :meth:`start` has probed it."""
        return self._embedder.fingerprint

    # Life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probes the embedder, opens the store and checks that both agree with the data."""
        width = await self._embedder.probe()
        too_wide = [d for d in self._dimensions if d > width]
        if too_wide:
            fitting = [d for d in self._dimensions if d <= width] or [width]
            raise StartupError(
                f"dimensions {too_wide} exceed the width {width} of the embedding model "
                f"{self._settings.embedding.model!r}; set KNN_DIMENSIONS to values up to {width}, "
                f"e.g. KNN_DIMENSIONS={','.join(map(str, fitting))}"
            )
        try:
            await self._store.open(self._dimensions)
        except Unavailable as exc:
            raise StartupError(f"{exc}; start it or check KNN_STORE__URL") from exc
        try:
            filling = await self._check_fingerprint(self._embedder.fingerprint)
            if upgraded := await self._classifiers.upgrade():
                log.info("gave %d classifier record(s) their revision", upgraded)
            for config in await self._classifiers.deleting():
                async with self._classifiers.deleting_classifier(config.name):
                    deleted = await self._delete(Selection(config.name))
                log.warning("finished deleting classifier %s (%d exemplars)", config.name, deleted)
            repaired = await self.repair()
            if filling:  # only now: a fill interrupted by a crash resumes at the next start
                await self._record_fingerprint(self._embedder.fingerprint)
        except (Unavailable, ResourceExhausted) as exc:
            raise StartupError(
                f"start-up could not check or repair the stored data: {exc}"
            ) from exc
        if filling:
            log.warning("filled the new dimensions %s: wrote %d vector(s)", filling, repaired)
        elif repaired:
            log.warning("repaired %d exemplar(s) missing from some dimensions", repaired)
        log.info("embedder width %d; dimensions %s", width, self._dimensions)

    async def _check_fingerprint(self, current: Fingerprint) -> list[int]:
        """Refuses to start on exemplars without a classifier record, or on vectors of another
        embedder; records the fingerprint if it changed.

        Returns the configured dimensions the stored exemplars have no vectors in yet, emptied
        for :meth:`repair` to fill; they are recorded as ``filling`` until it has.
        """
        recorded = await self._store.get_meta(FINGERPRINT_KEY)
        records = {str(p["name"]) for p in await self._store.list_meta("classifier")}
        held: dict[str, int] = {}  # classifier -> exemplars, in the dimension holding most
        for dimension in self._dimensions:
            for name, count in (await self._store.classifier_counts(dimension)).items():
                held[name] = max(held.get(name, 0), count)
        orphaned = sorted(set(held) - records)
        shown = ", ".join(f"{name!r} ({held[name]} exemplars)" for name in orphaned[:5])
        more = f" and {len(orphaned) - 5} more" if len(orphaned) > 5 else ""
        if orphaned and self._settings.store.delete_orphaned_exemplars:
            for name in orphaned:
                await self._delete(Selection(name))
                del held[name]
            log.warning("deleted exemplars without a classifier record: %s%s", shown, more)
        elif orphaned:
            raise StartupError(
                f"the store holds {sum(held[name] for name in orphaned)} exemplars of "
                f"{len(orphaned)} classifier(s) that have no classifier record: {shown}{more}. "
                "The records (the store's meta collection, edge/meta in the data directory) were "
                "lost; restore them from a backup. Starting without them would hide these "
                "exemplars and give them to any classifier created later under the same name; "
                "if the records are gone for good, start once with "
                "KNN_STORE__DELETE_ORPHANED_EXEMPLARS=true to delete the exemplars"
            )
        has_data = bool(records or held)
        filling: list[int] = []
        if recorded is not None and has_data:
            stored = Fingerprint.from_payload(recorded)
            if stored != current:
                raise StartupError(
                    f"the store holds vectors made by model={stored.model!r}, "
                    f"template={stored.template!r}, width={stored.width}, but this service "
                    f"embeds with model={current.model!r}, template={current.template!r}, "
                    f"width={current.width}; vectors of different embedders cannot be compared. "
                    f"Use the same embedder settings, or {MIGRATION_HINT}"
                )
            filling = sorted(set(self._dimensions) - set(recorded.get("dimensions", [])))
            if filling:
                await self._empty_for_filling(filling, recorded.get("filling", []))
        await self._record_fingerprint(current, recorded, filling)
        return filling

    async def _empty_for_filling(self, dimensions: list[int], interrupted: list[int]) -> None:
        """Empties the collections of new ``dimensions`` before they are filled, except those
        of a fill that was ``interrupted`` (they hold its progress). A dimension configured once,
        dropped and configured again still has its old collection, whose points missed every
        write since: left there, the repair would copy them into the other dimensions."""
        log.warning(
            "dimensions %s are new: filling them for the stored exemplars, from a wider stored "
            "vector where there is one, else by embedding the stored text",
            dimensions,
        )
        for dimension in sorted(set(dimensions) - set(interrupted)):
            for name in await self._store.classifier_counts(dimension):
                await self._store.delete(dimension, Selection(name))

    async def _record_fingerprint(
        self,
        current: Fingerprint,
        recorded: Payload | None = None,
        filling: Sequence[int] = (),
    ) -> None:
        """Records the embedder and the dimensions whose vectors are complete (and those being
        filled); writes nothing when ``recorded`` says the same already."""
        payload: dict[str, Any] = {
            **current.as_payload(),
            "kind": "fingerprint",
            "dimensions": [d for d in self._dimensions if d not in filling],
        }
        if filling:
            payload["filling"] = list(filling)
        if recorded is None or {k: v for k, v in recorded.items() if k != "key"} != payload:
            await self._store.put_meta(FINGERPRINT_KEY, payload)

    async def repair(self) -> int:
        """Completes exemplars missing from some dimensions: left so by an interrupted write or
        delete, or every exemplar in a newly configured dimension.

        A missing vector is the truncation of the exemplar's vector in a wider dimension where
        there is one, else the stored text is embedded again; dimensions are completed widest
        first, so a text is embedded once for all of them. Progress is logged. Returns how many
        (exemplar, dimension) pairs were written.
        """
        configs = await self._classifiers.all()
        present = {
            c.name: {d: await self._store.point_ids(d, c.name) for d in self._dimensions}
            for c in configs
        }
        total = sum(
            len(set().union(*held.values()) - ids)
            for held in present.values()
            for ids in held.values()
        )
        if not total:
            return 0
        progress = Progress(log, "completing exemplars missing from some dimensions", total)
        for config in configs:
            held = present[config.name]
            every = set().union(*held.values())
            for dimension in sorted(held, reverse=True):
                missing = every - held[dimension]
                for source in sorted(held, reverse=True):
                    found = sorted(missing & held[source])
                    for start in range(0, len(found), _REPAIR_BATCH):
                        batch = found[start : start + _REPAIR_BATCH]
                        await self._complete(config, dimension, source, batch)
                        progress.advance(len(batch))
                    missing -= set(found)
                    held[dimension] |= set(found)
        return total

    async def _complete(
        self, config: ClassifierConfig, dimension: int, source: int, ids: list[str]
    ) -> None:
        """Writes the points ``ids`` of ``source`` into ``dimension``."""
        records, vectors = await self._store.retrieve(source, ids)
        if source < dimension:
            prompts = [
                self._embedder.prompt(config.instruction, str(r.payload["text"])) for r in records
            ]
            vectors = await self._embedder.embed(prompts)
        await self._store.upsert(
            dimension,
            [r.id for r in records],
            truncate(vectors, dimension),
            [r.payload for r in records],
        )

    async def healthy(self) -> bool:
        """Whether the embedder and the store both answer (for the health service)."""
        if not await self._embedder.ping(within_s=5.0):
            return False
        try:
            await self._store.get_meta(FINGERPRINT_KEY)
        except Unavailable:
            return False
        return True

    async def stop(self) -> None:
        await self._coalescer.close()
        await self._store.close()
        await self._embedder.close()

    # Classifiers -----------------------------------------------------------------------------

    async def create_classifier(self, request: NewClassifier) -> ClassifierInfo:
        defaults = self._settings.defaults
        config = ClassifierConfig(
            name=validation.classifier_name(request.name, "name"),
            instruction=validation.instruction(request.instruction) or defaults.instruction,
            k=validation.k(request.k if request.k is not None else defaults.k, self._limits),
            voting=request.voting or Voting(defaults.voting),
            min_similarity=validation.fraction(
                _either(request.min_similarity, defaults.min_similarity), "min_similarity", -1, 1
            ),
            min_confidence=validation.fraction(
                _either(request.min_confidence, defaults.min_confidence), "min_confidence", 0, 1
            ),
            created_at=time.time(),
            temperature=validation.temperature(_either(request.temperature, defaults.temperature)),
        )
        return ClassifierInfo(await self._classifiers.create(config), 0)

    async def get_classifier(self, name: str) -> ClassifierInfo:
        config = await self._classifiers.get(name, "name")
        return ClassifierInfo(config, await self._count(Selection(config.name)))

    async def list_classifiers(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ClassifierInfo], str]:
        """A page of classifiers by name, and the token of the next page ("" after the last)."""
        size = paging.page_size(page_size, self._limits)
        scope = ("ListClassifiers",)
        after = paging.decode(page_token, scope)
        configs = await self._classifiers.all()
        following = [c for c in configs if after is None or c.name > after]
        page = [ClassifierInfo(c, await self._count(Selection(c.name))) for c in following[:size]]
        kept = paging.fitting(
            page, wire_size.classifier, self._limits.max_response_bytes, "a classifier"
        )
        more = kept < len(following)
        return page[:kept], paging.encode(page[kept - 1].config.name, scope) if more else ""

    async def update_classifier(self, update: ClassifierUpdate, etag: str = "") -> ClassifierInfo:
        """Changes the fields of ``update.paths``; changing how votes are cast drops the
        calibration, which was fitted for the old settings."""
        changes = updates.validated_changes(update, self._limits, self._dimensions)

        def change(config: ClassifierConfig) -> ClassifierConfig:
            updated = dataclasses.replace(config, **changes)
            voting_changed = any(
                getattr(updated, f) != getattr(config, f) for f in ("k", "voting", "dimension")
            ) or np.float32(updated.temperature) != np.float32(config.temperature)
            return dataclasses.replace(updated, calibration=None) if voting_changed else updated

        updated = await self._classifiers.update(
            update.name, change, etag=etag, field="classifier.name"
        )
        log.info("updated classifier %s: %s", updated.name, ", ".join(sorted(changes)))
        return ClassifierInfo(updated, await self._count(Selection(updated.name)))

    async def exemplar_counts(self) -> list[tuple[str, int]]:
        """Every classifier's name and exemplar count (for the metrics)."""
        return [
            (c.name, await self._count(Selection(c.name))) for c in await self._classifiers.all()
        ]

    def info(self) -> ServiceInfo:
        """The dimensions, embedding model and limits a caller may adapt to."""
        fingerprint = self._embedder.fingerprint
        return ServiceInfo(
            server_version=importlib.metadata.version("knn-classifier-server"),
            dimensions=list(self._dimensions),
            model=fingerprint.model,
            width=fingerprint.width,
            limits=self._limits,
        )

    async def delete_classifier(self, name: str, etag: str = "") -> int:
        """Deletes the classifier's exemplars, then its record; see :class:`Classifiers`."""
        deleted = await completed(self._delete_classifier_locked(name, etag))
        log.info("deleted classifier %s (%d exemplars)", name, deleted)
        return deleted

    async def _delete_classifier_locked(self, name: str, etag: str) -> int:
        async with self._classifiers.deleting_classifier(name, etag=etag) as config:
            return await self._delete(Selection(config.name))

    async def _count(self, selection: Selection) -> int:
        return await self._store.count(self._dimensions[0], selection)

    # Exemplars -------------------------------------------------------------------------------

    async def add_exemplars(
        self, classifier: str, items: Sequence[ExemplarInput], etag: str = ""
    ) -> tuple[list[str], str]:
        """Embeds ``items`` once and writes them to every dimension; returns their ids and the
        classifier's etag after the write.

        The embedding call may take long and the classifier may change meanwhile, so the write
        happens under the classifier's write lock, on the record as it is then: deleted or
        re-created since, the add fails with NOT_FOUND and writes nothing.
        """
        validation.batch_size(len(items), self._limits, "exemplars")
        for i, item in enumerate(items):
            validation.text(item.text, self._limits, f"exemplars[{i}].text")
            validation.label(item.label, f"exemplars[{i}].label")
            validation.exemplar_id(item.id, f"exemplars[{i}].id")
            validation.metadata(item.metadata, f"exemplars[{i}].metadata")
        config = await self._classifiers.get(classifier)

        ids = [item.id or derived_exemplar_id(classifier, item.text) for item in items]
        # A repeated id within the batch: the last occurrence wins, as it would across calls.
        latest = {exemplar_id: i for i, exemplar_id in enumerate(ids)}
        chosen = sorted(latest.values())
        if len(chosen) > self._limits.max_exemplars_per_classifier:
            raise self._limit_reached(classifier, 0, len(chosen))
        prompts = [self._embedder.prompt(config.instruction, items[i].text) for i in chosen]
        vectors = await self._embedder.embed(prompts)
        written = await completed(
            self._write_locked(classifier, config.uid, etag, items, ids, chosen, vectors)
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
        vectors: Matrix,
    ) -> ClassifierConfig:
        """AddExemplars' write, under the classifier's lock; returns the record after it."""
        async with self._classifiers.writing(classifier, uid=uid, etag=etag) as current:
            now = time.time()
            point_ids = [_point_id(current, ids[i]) for i in chosen]
            payloads = [
                _payload(classifier, ids[i], items[i].label, items[i].text, items[i].metadata, now)
                for i in chosen
            ]
            created = await self._absent(classifier, point_ids)
            await self._check_room(classifier, len(created))
            await self._write_everywhere(classifier, point_ids, created, vectors, payloads)
            try:
                return await self._classifiers.bump(current)
            except NotFound:
                await self._delete(Selection(classifier, ids=point_ids))
                raise

    async def restore_classifier(self, config: ClassifierConfig) -> ClassifierConfig:
        """The migration's copy of a classifier record from another store: created with
        ``config``'s settings, calibration and creation time (a new incarnation), or the
        classifier already here if it has the same instruction (a migration resumed).
        ALREADY_EXISTS if one of that name has another instruction: its vectors would not be
        comparable with the copied exemplars'."""
        try:
            return await self._classifiers.create(config)
        except AlreadyExists:
            existing = await self._classifiers.get(config.name)
            if existing.instruction != config.instruction:
                raise AlreadyExists(
                    f"classifier {config.name!r} already exists with another instruction "
                    f"({existing.instruction!r}, not {config.instruction!r}); delete it or "
                    "migrate into another store",
                    resource=errors.classifier(config.name),
                ) from None
            return existing

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
            _payload(config.name, e.id, e.label, e.text, e.metadata, e.created_at)
            for e in exemplars
        ]
        held = await self._held_everywhere(config.name, point_ids)
        todo = [i for i, point in enumerate(point_ids) if held.get(point) != payloads[i]]
        if not todo:
            return 0, 0
        if vectors is None:
            prompts = [self._embedder.prompt(config.instruction, exemplars[i].text) for i in todo]
            _, written, rejected = await self._embed_isolating_rejects(prompts, direct=True)
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
        await completed(self._restore_locked(config, ids, written, [payloads[i] for i in todo]))
        return len(todo), len(todo) if vectors is None else 0

    async def _restore_locked(
        self,
        config: ClassifierConfig,
        point_ids: list[str],
        vectors: Matrix,
        payloads: list[Payload],
    ) -> None:
        """restore_exemplars' write, under the classifier's lock."""
        async with self._classifiers.writing(config.name, uid=config.uid) as current:
            created = await self._absent(config.name, point_ids)
            await self._check_room(config.name, len(created))
            await self._write_everywhere(config.name, point_ids, created, vectors, payloads)
            await self._classifiers.bump(current)

    async def _held_everywhere(self, classifier: str, point_ids: list[str]) -> dict[str, Payload]:
        """The payloads of those of ``point_ids`` that every dimension holds."""
        held: dict[str, Payload] | None = None
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
        classifier: str,
        point_ids: list[str],
        created: list[str],
        vectors: Matrix,
        payloads: list[dict[str, Any]],
    ) -> None:
        """Writes the points to every dimension, or (best effort) to none.

        If a dimension fails, the ``created`` points (new with this call) are deleted again
        from the dimensions already written, so no new exemplar is left half-present. Points
        that existed before keep the new version where it was written. If the rollback itself
        fails, start-up repair completes the leftovers in every dimension instead.
        """
        written: list[int] = []
        try:
            for dimension in self._dimensions:
                await self._store.upsert(
                    dimension, point_ids, truncate(vectors, dimension), payloads
                )
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
            raise

    async def _check_room(self, classifier: str, adding: int) -> None:
        """Refuses new exemplars that would take the classifier past its exemplar limit.

        Runs under the classifier's write lock with ``adding`` the points that are new, so within
        one process the limit is never passed.
        """
        held = await self._count(Selection(classifier))
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
        self, classifier: str, ids: Sequence[str] = (), label: str = "", etag: str = ""
    ) -> tuple[int, str]:
        """Deletes exemplars by ids or by label; returns how many and the classifier's etag."""
        if bool(ids) == bool(label):
            raise InvalidArgument(
                "give either ids or a label, not both and not neither",
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
        else:
            validation.label(label)
        return await completed(self._delete_locked(classifier, ids, label, etag))

    async def _delete_locked(
        self, classifier: str, ids: Sequence[str], label: str, etag: str
    ) -> tuple[int, str]:
        """DeleteExemplars under the classifier's lock; the revision moves only if something
        was deleted, so a delete of nothing fails nobody's conditional write."""
        async with self._classifiers.writing(classifier, etag=etag) as current:
            selection = Selection(
                current.name,
                ids=[_point_id(current, exemplar_id) for exemplar_id in ids] if ids else None,
                label=label or None,
            )
            deleted = await self._delete(selection)
            written = await self._classifiers.bump(current) if deleted else current
        return deleted, written.etag

    async def _delete(self, selection: Selection) -> int:
        count = await self._count(selection)
        for dimension in self._dimensions:
            await self._store.delete(dimension, selection)
        return count

    async def list_exemplars(
        self, classifier: str, page_size: int, page_token: str, label: str
    ) -> tuple[list[Exemplar], str]:
        """A page of exemplars in id order, and the token of the next page ("" after the last)."""
        size = paging.page_size(page_size, self._limits)
        scope = ("ListExemplars", classifier, label)
        offset = _point_offset(paging.decode(page_token, scope))
        await self._classifiers.get(classifier)
        selection = Selection(classifier, label=validation.label(label) if label else None)
        records, next_offset = await self._store.scroll(
            self._dimensions[0], selection, size, offset
        )
        exemplars = [stored_exemplar(record) for record in records]
        kept = paging.fitting(
            exemplars, wire_size.exemplar, self._limits.max_response_bytes, "one exemplar"
        )
        if kept < len(records):
            next_offset = records[kept].id  # the store's offsets are the first id of a page
        return exemplars[:kept], paging.encode(next_offset, scope) if next_offset else ""

    async def list_labels(
        self, classifier: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[tuple[str, int]], str]:
        """A page of (label, exemplar count), most exemplars first, then by label; and the token
        of the next page ("" after the last). A page continues after the previous page's last
        (count, label), so labels whose counts change between pages may be listed twice or not
        at all."""
        size = paging.page_size(page_size, self._limits)
        scope = ("ListLabels", classifier)
        after = _label_position(paging.decode(page_token, scope))
        await self._classifiers.get(classifier)
        counts = await self._store.label_counts(self._dimensions[0], classifier)
        ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        following = [i for i in ordered if after is None or (-i[1], i[0]) > after]
        kept = paging.fitting(
            following[:size],
            lambda item: wire_size.label_count(item[0]),
            self._limits.max_response_bytes,
            "a label",
        )
        page = following[:kept]
        if kept == len(following):
            return page, ""
        last_label, last_count = page[-1]
        return page, paging.encode(f"{last_count}:{last_label}", scope)

    # Classification --------------------------------------------------------------------------

    async def classify(
        self, classifier: str, texts: Sequence[str], options: ClassifyOptions
    ) -> tuple[list[Vote | InvalidArgument], str]:
        """Classifies ``texts`` with one embedding call and one batched store query; returns
        the answers and the etag of the classifier's record they were given with.

        A text that is invalid, or that the embedding model rejects, gets its InvalidArgument in
        its slot instead of a vote, and the others are classified; any other failure fails the
        whole call.
        """
        validation.batch_size(len(texts), self._limits, "texts")
        config = await self._classifiers.get(classifier)
        k = validation.k(_either(options.k, config.k), self._limits, "options.k")
        validation.neighbours(len(texts), k, self._limits)
        dimension = validation.dimension(
            _either(options.dimension, config.dimension or self._dimensions[-1]),
            self._dimensions,
            "options.dimension",
        )
        voting = options.voting or config.voting
        temperature = validation.temperature(
            _either(options.temperature, config.temperature), "options.temperature"
        )
        min_similarity = validation.fraction(
            _either(options.min_similarity, config.min_similarity), "options.min_similarity", -1, 1
        )
        min_confidence = validation.fraction(
            _either(options.min_confidence, config.min_confidence), "options.min_confidence", 0, 1
        )
        # The calibration was fitted for the classifier's own settings; others get raw shares.
        # Temperatures as the wire carries them (float32): the classifier's own, sent back,
        # must count as its own.
        own = (
            config.k,
            config.voting,
            config.dimension or self._dimensions[-1],
            np.float32(config.temperature),
        )
        asked = (k, voting, dimension, np.float32(temperature))
        calibration = config.calibration if asked == own else None

        answers: list[Vote | InvalidArgument | None] = [None] * len(texts)
        valid: list[int] = []
        for i, text in enumerate(texts):
            try:
                validation.text(text, self._limits, _text_field(i, len(texts)))
                valid.append(i)
            except InvalidArgument as invalid:
                answers[i] = invalid
        prompts = [self._embedder.prompt(config.instruction, texts[i]) for i in valid]
        embedded, vectors, rejected = await self._embed_isolating_rejects(prompts)
        for j, rejection in rejected.items():
            i = valid[j]
            answers[i] = InvalidArgument(
                rejection.message, reason=rejection.reason, field=_text_field(i, len(texts))
            )
        if embedded:
            queries = truncate(vectors, dimension)
            results = await self._queries.query(dimension, classifier, queries, k)
            if not results[0]:
                raise _no_exemplars(classifier)
            with tracing.span("vote"):
                tracing.annotate(voting=voting.value, texts=len(results))
                labels: list[str] = []
                by_label = np.empty((len(queries), 0), dtype=np.float32)
                if voting in label_models.FIT:
                    fit = label_models.FIT[voting]
                    model = await self._store.label_model(dimension, classifier, fit)
                    if not model.labels:  # every exemplar was deleted since the neighbour query
                        raise _no_exemplars(classifier)
                    labels, by_label = model.labels, model.scores(queries)
                checks = await self._scope_checks(config, dimension, queries, results)
                for j, hits in enumerate(results):
                    neighbours = [_neighbour(hit) for hit in hits]
                    answer = vote(
                        neighbours,
                        voting,
                        min_similarity,
                        min_confidence,
                        temperature,
                        calibration,
                        list(zip(labels, by_label[j].tolist(), strict=True)),
                        config.label_temperature,
                    )
                    answers[valid[embedded[j]]] = (
                        out_of_scope.judged(answer, checks[j]) if checks else answer
                    )
        return [a for a in answers if a is not None], config.etag

    async def _scope_checks(
        self,
        config: ClassifierConfig,
        dimension: int,
        queries: Matrix,
        results: Sequence[Sequence[Record]],
    ) -> list[ScopeCheck]:
        """Each query's out-of-scope check, if the classifier has a rule for ``dimension``."""
        rule = config.out_of_scope
        if rule is None or rule.dimension != dimension:
            return []
        model = await self._store.label_model(dimension, config.name, out_of_scope.model_fit)
        if model is None:
            return []
        nearest = [hits[0] for hits in results]
        scores = out_of_scope.scores(
            model,
            rule,
            queries,
            [hit.score for hit in nearest],
            [str(hit.payload["label"]) for hit in nearest],
        )
        return [ScopeCheck(s, rule.threshold, rule.target_coverage) for s in scores.tolist()]

    async def _embed_isolating_rejects(
        self, prompts: Sequence[str], direct: bool = False
    ) -> tuple[list[int], Matrix, dict[int, InvalidArgument]]:
        """Embeds ``prompts`` together; if the model rejects the batch, finds the culprits.

        Returns the positions embedded, their vectors (row i for position i of the list) and the
        rejection of each other position. SGLang rejects a whole batch for one bad text, so a
        rejected batch is retried one text per call. ``direct``: call the embedder directly
        rather than through the coalescer (which is for Classify's small batches).
        """
        if not prompts:
            return [], np.empty((0, 0), dtype=np.float32), {}
        send = self._embedder.embed_uncached if direct else self._coalescer.embed
        try:
            every = await self._embedder.embed(prompts, send)
            return list(range(len(prompts))), every, {}
        except InvalidArgument as whole:
            if len(prompts) == 1:
                return [], np.empty((0, 0), dtype=np.float32), {0: whole}
        rows: dict[int, Matrix] = {}
        rejected: dict[int, InvalidArgument] = {}
        for j, prompt in enumerate(prompts):
            try:
                rows[j] = await self._embedder.embed([prompt], send)
            except InvalidArgument as one:
                rejected[j] = one
        embedded = sorted(rows)
        vectors = np.vstack([rows[j] for j in embedded]) if embedded else np.empty((0, 0))
        return embedded, vectors.astype(np.float32, copy=False), rejected

    # Evaluation ------------------------------------------------------------------------------

    async def evaluate(
        self, classifier: str, request: EvaluateRequest, etag: str = ""
    ) -> tuple[Evaluation, ClassifierInfo]:
        """Scores every setting of the sweep, best first; see the Evaluate RPC. ``etag``: the
        revision apply_best may change (ABORTED if the classifier is at another)."""
        config = await self._classifiers.get(classifier, etag=etag)
        evaluation = await self._evaluator.evaluate(config, request)
        proposed = evaluation.updated
        if proposed is not None:
            # Conditional on the revision the sweep read: a classifier deleted or changed
            # during the sweep is not overwritten with settings fitted to its old exemplars.
            config = await self._classifiers.update(
                classifier, lambda _: proposed, uid=config.uid, etag=config.etag
            )
            log.info("classifier %s: applied the best setting of an Evaluate", config.name)
        return evaluation, ClassifierInfo(config, evaluation.exemplar_count)


def _payload(
    classifier: str,
    exemplar_id: str,
    label: str,
    text: str,
    metadata: dict[str, str],
    created_at: float,
) -> Payload:
    """An exemplar's payload, the same in every dimension."""
    return {
        "classifier": classifier,
        "id": exemplar_id,
        "label": label,
        "text": text,
        "metadata": dict(metadata),
        "created_at": created_at,
    }


async def completed(write: Coroutine[Any, Any, T]) -> T:
    """Runs ``write`` to its end even if the caller is cancelled (its deadline passed, or it
    hung up): stopped between two dimensions, a write would leave exemplars in some only, and
    a delete would leave its classifier marked "deleting". The caller still gets its
    cancellation; a failure after it is logged."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_failure_after_cancel)
        raise


def _log_failure_after_cancel(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a write finished after its caller left, with %r", task.exception())


def _no_exemplars(classifier: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"classifier {classifier!r} has no exemplars; add some with AddExemplars",
        reason=Reason.CLASSIFIER_EMPTY,
        resource=errors.classifier(classifier),
    )


def _text_field(i: int, count: int) -> str:
    """The request field of text ``i``: Classify's ``text``, or ClassifyBatch's ``texts[i]``."""
    return "text" if count == 1 else f"texts[{i}]"


def _either(override: T | None, default: T) -> T:
    return default if override is None else override


def _neighbour(record: Record) -> Neighbour:
    payload = record.payload
    return Neighbour(str(payload["id"]), str(payload["label"]), str(payload["text"]), record.score)


def stored_exemplar(record: Record) -> Exemplar:
    """The exemplar a stored point holds."""
    payload = record.payload
    return Exemplar(
        id=str(payload["id"]),
        text=str(payload["text"]),
        label=str(payload["label"]),
        metadata={str(k): str(v) for k, v in (payload.get("metadata") or {}).items()},
        created_at=float(payload.get("created_at", 0.0)),
    )


def _point_offset(cursor: str | None) -> str | None:
    """The store offset (a point id) at which a ListExemplars page starts."""
    if cursor is None:
        return None
    try:
        return str(uuid.UUID(cursor))
    except ValueError:
        raise paging.bad_token() from None


def _label_position(cursor: str | None) -> tuple[int, str] | None:
    """The sort key (-count, label) after which a ListLabels page starts."""
    if cursor is None:
        return None
    count, _, label = cursor.partition(":")
    try:
        return -int(count), label
    except ValueError:
        raise paging.bad_token() from None
