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

from . import errors, hygiene, paging, transfer, updates, validation, wire_size
from .classification import Classification, embed_isolating_rejects
from .classifiers import Classifiers
from .coalescing import QueryBatcher
from .derived import ExemplarModels
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
    either,
)
from .embedding_pipeline import EmbeddingPipeline
from .errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    Reason,
    ResourceExhausted,
    Unavailable,
)
from .evaluate import Evaluation, Evaluator
from .metrics import Metrics
from .settings import LimitSettings, Settings
from .startup_repair import FINGERPRINT_KEY, StartupRepair
from .store import Record, Selection, Store
from .store.schema import ExemplarPayload, exemplar_payload
from .transfer import VectorSet
from .vectors import Fingerprint, Matrix
from .voting import Vote, Voting

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("0f4a6c1e-2b7d-4e58-9a31-6c8e2d5b7f90")

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
        self,
        settings: Settings,
        embedder: EmbeddingPipeline,
        store: Store,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store
        self._classifiers = Classifiers(store)
        self._evaluator = Evaluator(settings, embedder, store)
        self._checker = hygiene.Checker(settings, store)
        self._startup = StartupRepair(settings, embedder, store, self._classifiers, self._delete)
        self._classification = Classification(
            settings.limits,
            settings.dimensions,
            embedder,
            self._classifiers,
            QueryBatcher(store, metrics),
            ExemplarModels(store, settings.store.model_cache_entries, metrics),
        )

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
        await self._startup.start()

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
                either(request.min_similarity, defaults.min_similarity), "min_similarity", -1, 1
            ),
            min_confidence=validation.fraction(
                either(request.min_confidence, defaults.min_confidence), "min_confidence", 0, 1
            ),
            created_at=time.time(),
            temperature=validation.temperature(either(request.temperature, defaults.temperature)),
            dimension=validation.dimension(request.dimension, self._dimensions, "dimension")
            if request.dimension
            else 0,
            calibration=transfer.restored_calibration(request, self._embedder.fingerprint),
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
        vectors: VectorSet,
    ) -> ClassifierConfig:
        """AddExemplars' write, under the classifier's lock; returns the record after it."""
        async with self._classifiers.writing(classifier, uid=uid, etag=etag) as current:
            now = time.time()
            point_ids = [_point_id(current, ids[i]) for i in chosen]
            payloads = [
                exemplar_payload(
                    classifier, ids[i], items[i].label, items[i].text, items[i].metadata, now
                )
                for i in chosen
            ]
            created = await self._absent(classifier, point_ids)
            await self._check_room(classifier, len(created))
            await self._write_everywhere(current, point_ids, created, vectors, payloads)
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
            exemplar_payload(config.name, e.id, e.label, e.text, e.metadata, e.created_at)
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
        await completed(self._restore_locked(config, ids, VectorSet.of(written), payloads))
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
            await self._write_everywhere(current, point_ids, created, vectors, payloads)
            await self._classifiers.bump(current)

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
        self,
        classifier: str,
        page_size: int,
        page_token: str,
        label: str,
        vector_dimensions: Sequence[int] | None = None,
    ) -> tuple[list[Exemplar], str]:
        """A page of exemplars in id order, and the token of the next page ("" after the last);
        with ``vector_dimensions`` (empty: all), with their vectors of those dimensions."""
        size = paging.page_size(page_size, self._limits)
        scope = ("ListExemplars", classifier, label)
        offset = _point_offset(paging.decode(page_token, scope))
        dimensions = (
            []
            if vector_dimensions is None
            else transfer.vector_dimensions(vector_dimensions, self._dimensions)
        )
        await self._classifiers.get(classifier)
        selection = Selection(classifier, label=validation.label(label) if label else None)
        records, next_offset = await self._store.scroll(
            self._dimensions[0], selection, size, offset
        )
        exemplars = [stored_exemplar(record) for record in records]
        vectors = wire_size.vectors(dimensions)
        kept = paging.fitting(
            exemplars,
            lambda e: wire_size.exemplar(e) + vectors,
            self._limits.max_response_bytes,
            "one exemplar",
        )
        if kept < len(records):
            next_offset = records[kept].id  # the store's offsets are the first id of a page
        exemplars = exemplars[:kept]
        if dimensions:
            point_ids = [record.id for record in records[:kept]]
            exemplars = await transfer.with_vectors(self._store, exemplars, point_ids, dimensions)
        return exemplars, paging.encode(next_offset, scope) if next_offset else ""

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
        """See :meth:`Classification.classify`."""
        return await self._classification.classify(classifier, texts, options)

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

    async def check_exemplars(
        self, classifier: str, request: hygiene.CheckRequest
    ) -> tuple[hygiene.Report, str]:
        """The exemplar hygiene report (see CheckExemplars) and the etag it was made at."""
        config = await self._classifiers.get(classifier)
        return await self._checker.check(config, request), config.etag


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


def stored_exemplar(record: Record) -> Exemplar:
    """The exemplar a stored point holds."""
    payload = record.payload
    return Exemplar(
        id=payload["id"],
        text=payload["text"],
        label=payload["label"],
        metadata=payload["metadata"],
        created_at=payload["created_at"],
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
