"""The transport-free core: classifiers, exemplars and classification over an embedder and a store.

Knows nothing of gRPC: it takes and returns domain types and raises the errors of ``errors``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
from collections.abc import Sequence

import numpy as np

from . import errors, evaluation_budget, hygiene, paging, transfer, updates, validation, wire_size
from .classification import Classification
from .classifiers import Classifiers
from .coalescing import QueryBatcher
from .completion import completed
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
from .errors import AlreadyExists, InvalidArgument, Unavailable
from .evaluate import Evaluation, Evaluator
from .exemplar_writes import ExemplarWrites
from .metrics import Metrics
from .settings import LimitSettings, Settings
from .startup_repair import FINGERPRINT_KEY, StartupRepair
from .store import Selection, Store
from .vectors import Fingerprint, Matrix
from .voting import LABEL_TEMPERATURE, Vote, Voting

log = logging.getLogger(__name__)


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
        self._classifiers = Classifiers(store, settings.store.write_lease_s)
        self._evaluator = Evaluator(settings, embedder, store)
        self._checker = hygiene.Checker(settings, store)
        self._writes = ExemplarWrites(settings, embedder, store, self._classifiers)
        self._startup = StartupRepair(
            settings, embedder, store, self._classifiers, self._writes.delete
        )
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
        """Whether the embedder and the store both answer (for the health service). The
        embedder counts as up if a call was answered within one health interval (see
        :meth:`~.embedding.EmbeddingClient.up`)."""
        if not await self._embedder.up(
            self._settings.server.health_interval_s, probe_timeout_s=5.0
        ):
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
            label_temperature=transfer.restored_label_temperature(request),
            out_of_scope=transfer.restored_out_of_scope(
                request, self._embedder.fingerprint, self._dimensions
            ),
        )
        return ClassifierInfo(await self._classifiers.create(config), 0)

    async def get_classifier(self, name: str) -> ClassifierInfo:
        config = await self._classifiers.get(name, "name")
        return ClassifierInfo(config, await self._writes.count(Selection(config.name)))

    async def list_classifiers(
        self, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[ClassifierInfo], str]:
        """A page of classifiers by name, and the token of the next page ("" after the last)."""
        size = paging.page_size(page_size, self._limits)
        scope = ("ListClassifiers",)
        after = paging.decode(page_token, scope)
        configs = await self._classifiers.all()
        following = [c for c in configs if after is None or c.name > after]
        page = [
            ClassifierInfo(c, await self._writes.count(Selection(c.name))) for c in following[:size]
        ]
        kept = paging.fitting(
            page, wire_size.classifier, self._limits.max_response_bytes, "a classifier"
        )
        more = kept < len(following)
        return page[:kept], paging.encode(page[kept - 1].config.name, scope) if more else ""

    async def update_classifier(self, update: ClassifierUpdate, etag: str = "") -> ClassifierInfo:
        """Changes the fields of ``update.paths``; changing how votes are cast drops the
        calibration, which was fitted for the old settings, and the label models' temperature
        fitted with it (which travels only with a calibration: an export would lose it)."""
        changes = updates.validated_changes(update, self._limits, self._dimensions)

        def change(config: ClassifierConfig) -> ClassifierConfig:
            updated = dataclasses.replace(config, **changes)
            voting_changed = any(
                getattr(updated, f) != getattr(config, f) for f in ("k", "voting", "dimension")
            ) or np.float32(updated.temperature) != np.float32(config.temperature)
            if not voting_changed:
                return updated
            return dataclasses.replace(
                updated, calibration=None, label_temperature=LABEL_TEMPERATURE
            )

        updated = await self._classifiers.update(
            update.name, change, etag=etag, field="classifier.name"
        )
        log.info("updated classifier %s: %s", updated.name, ", ".join(sorted(changes)))
        return ClassifierInfo(updated, await self._writes.count(Selection(updated.name)))

    async def exemplar_counts(self) -> list[tuple[str, int]]:
        """Every classifier's name and exemplar count (for the metrics)."""
        return [
            (c.name, await self._writes.count(Selection(c.name)))
            for c in await self._classifiers.all()
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
            return await self._writes.delete(Selection(config.name))

    # Exemplars -------------------------------------------------------------------------------

    async def add_exemplars(
        self,
        classifier: str,
        items: Sequence[ExemplarInput],
        etag: str = "",
        embedder_fingerprint: str = "",
    ) -> tuple[list[str], str]:
        """See :meth:`ExemplarWrites.add_exemplars`."""
        return await self._writes.add_exemplars(classifier, items, etag, embedder_fingerprint)

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
        """See :meth:`ExemplarWrites.restore_exemplars`."""
        return await self._writes.restore_exemplars(config, exemplars, vectors)

    async def delete_exemplars(
        self,
        classifier: str,
        ids: Sequence[str] = (),
        label: str = "",
        etag: str = "",
        out_of_scope: bool | None = None,
    ) -> tuple[int, str]:
        """See :meth:`ExemplarWrites.delete_exemplars`."""
        return await self._writes.delete_exemplars(classifier, ids, label, etag, out_of_scope)

    async def list_exemplars(
        self,
        classifier: str,
        page_size: int,
        page_token: str,
        label: str,
        vector_dimensions: Sequence[int] | None = None,
        out_of_scope: bool | None = None,
    ) -> tuple[list[Exemplar], str, str]:
        """A page of exemplars in id order, the token of the next page ("" after the last) and
        the classifier's etag read before the page; with ``vector_dimensions`` (empty: all),
        with their vectors of those dimensions; with ``out_of_scope``, of the negative
        exemplars only (True) or of the others (False)."""
        size = paging.page_size(page_size, self._limits)
        # Tokens of the whole list name no scope, as they did before there were scopes.
        scope: tuple[str, ...] = ("ListExemplars", classifier, label)
        if out_of_scope is not None:
            scope += ("out_of_scope" if out_of_scope else "in_scope",)
        offset = paging.point_offset(paging.decode(page_token, scope))
        dimensions = (
            []
            if vector_dimensions is None
            else transfer.vector_dimensions(vector_dimensions, self._dimensions)
        )
        config = await self._classifiers.get(classifier)
        selection = Selection(
            classifier,
            label=validation.label(label) if label else None,
            out_of_scope=out_of_scope,
        )
        records, next_offset = await self._store.scroll(
            self._dimensions[0], selection, size, offset
        )
        exemplars = [Exemplar.stored(record) for record in records]
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
        return exemplars, paging.encode(next_offset, scope) if next_offset else "", config.etag

    async def list_labels(
        self, classifier: str, page_size: int = 0, page_token: str = ""
    ) -> tuple[list[tuple[str, int]], str, int, str]:
        """A page of (label, exemplar count), most exemplars first, then by label; the token
        of the next page ("" after the last); the number of negative exemplars, which are
        in no label; and the classifier's etag read before the page. A page continues after the
        previous page's last (count, label), so labels whose counts change between pages may be
        listed twice or not at all.

        Both counts go by each point's stored flag, never by the record's ``holds_negatives``
        mark: a negative stored after the record was read is still in no label. Both stores
        index the flag, so the filter costs about what the unfiltered count did."""
        size = paging.page_size(page_size, self._limits)
        scope = ("ListLabels", classifier)
        after = paging.label_position(paging.decode(page_token, scope))
        config = await self._classifiers.get(classifier)
        negatives = await self._writes.count(Selection(classifier, out_of_scope=True))
        counts = await self._store.label_counts(self._dimensions[0], classifier, False)
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
            return page, "", negatives, config.etag
        last_label, last_count = page[-1]
        token = paging.encode(paging.label_cursor(last_count, last_label), scope)
        return page, token, negatives, config.etag

    # Classification --------------------------------------------------------------------------

    async def classify(
        self, classifier: str, texts: Sequence[str], options: ClassifyOptions
    ) -> tuple[list[Vote | InvalidArgument], str]:
        """See :meth:`Classification.classify`."""
        return await self._classification.classify(classifier, texts, options)

    # Evaluation ------------------------------------------------------------------------------

    async def evaluate(
        self, classifier: str, request: EvaluateRequest, etag: str = ""
    ) -> tuple[Evaluation, ClassifierInfo, int]:
        """Scores every setting of the sweep, best first; see the Evaluate RPC. ``etag``: the
        revision apply_best may change (ABORTED if the classifier is at another). Also how many
        leading results keep their per-label metrics in the response (refused, before
        apply_best stores anything, if it cannot fit even without)."""
        config = await self._classifiers.get(classifier, etag=etag)
        evaluation = await self._evaluator.evaluate(config, request)
        proposed = evaluation.updated
        with_labels = await asyncio.to_thread(  # as many metrics as labels x settings
            evaluation_budget.results_with_labels,
            evaluation,
            ClassifierInfo(proposed or config, evaluation.exemplar_count),
            self._limits.max_response_bytes,
        )
        if proposed is not None:
            # Conditional on the revision the sweep read: a classifier deleted or changed
            # during the sweep is not overwritten with settings fitted to its old exemplars.
            config = await self._classifiers.update(
                classifier, lambda _: proposed, uid=config.uid, etag=config.etag
            )
            log.info("classifier %s: applied the best setting of an Evaluate", config.name)
        return evaluation, ClassifierInfo(config, evaluation.exemplar_count), with_labels

    async def check_exemplars(
        self, classifier: str, request: hygiene.CheckRequest
    ) -> tuple[hygiene.Report, str]:
        """The exemplar hygiene report (see CheckExemplars) and the etag it was made at."""
        config = await self._classifiers.get(classifier)
        return await self._checker.check(config, request), config.etag
