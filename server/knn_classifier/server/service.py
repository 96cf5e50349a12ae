"""The transport-free core: classifiers, exemplars and classification over an embedder and a store.

Knows nothing of gRPC: it takes and returns domain types and raises the errors of ``errors``.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from . import label_models, tracing, validation
from .coalescing import Coalescer, QueryBatcher
from .domain import (
    ClassifierConfig,
    ClassifierInfo,
    ClassifyOptions,
    EvaluateRequest,
    Exemplar,
    ExemplarInput,
    NewClassifier,
    classifier_key,
)
from .embedding import Embedder, Fingerprint, Matrix, truncate
from .errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StartupError,
    Unavailable,
)
from .evaluation import Report
from .evaluator import Evaluator
from .metrics import Metrics
from .settings import Settings
from .store import Record, Selection, Store
from .voting import LABEL_SCORED, Neighbour, Vote, Voting, vote

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("0f4a6c1e-2b7d-4e58-9a31-6c8e2d5b7f90")
_FINGERPRINT_KEY = "embedder-fingerprint"
_DEFAULT_PAGE_SIZE = 100

T = TypeVar("T")


def derived_exemplar_id(classifier: str, text: str) -> str:
    """The id of an exemplar added without one: adding the same text again updates it."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"text\x00{classifier}\x00{text}"))


def _point_id(classifier: str, exemplar_id: str) -> str:
    """The store's point id: exemplar ids are per classifier, point ids are global UUIDs."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"point\x00{classifier}\x00{exemplar_id}"))


class ClassifierService:
    def __init__(
        self, settings: Settings, embedder: Embedder, store: Store, metrics: Metrics | None = None
    ) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store
        self._create_lock = asyncio.Lock()
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
        await self._check_fingerprint(self._embedder.fingerprint)
        repaired = await self.repair()
        if repaired:
            log.warning("repaired %d exemplar(s) missing from some dimensions", repaired)
        log.info("embedder width %d; dimensions %s", width, self._dimensions)

    async def _check_fingerprint(self, current: Fingerprint) -> None:
        recorded = await self._store.get_meta(_FINGERPRINT_KEY)
        has_data = bool(await self._store.list_meta("classifier"))
        if recorded is not None and has_data:
            stored = Fingerprint(
                str(recorded["model"]), str(recorded["template"]), int(recorded["width"])
            )
            if stored != current:
                raise StartupError(
                    f"the store holds vectors made by model={stored.model!r}, "
                    f"template={stored.template!r}, width={stored.width}, but this service "
                    f"embeds with model={current.model!r}, template={current.template!r}, "
                    f"width={current.width}; vectors of different embedders cannot be compared. "
                    "Use the same embedder settings, or a new KNN_DATA_DIR / collection prefix"
                )
            missing = sorted(set(self._dimensions) - set(recorded.get("dimensions", [])))
            if missing:
                raise StartupError(
                    f"dimensions {missing} are new, but the store already holds exemplars that "
                    "have no vectors in them; remove them from KNN_DIMENSIONS or start on an "
                    "empty store"
                )
        payload: dict[str, Any] = {
            **current.as_payload(),
            "kind": "fingerprint",
            "dimensions": self._dimensions,
        }
        await self._store.put_meta(_FINGERPRINT_KEY, payload)

    async def repair(self) -> int:
        """Completes exemplars that an interrupted write or delete left in some dimensions only.

        A missing vector is the truncation of the exemplar's vector in a wider dimension where
        there is one, else the stored text is embedded again. Returns how many (exemplar,
        dimension) pairs were written.
        """
        repaired = 0
        for payload in await self._store.list_meta("classifier"):
            config = ClassifierConfig.from_payload(payload)
            present = {d: await self._store.point_ids(d, config.name) for d in self._dimensions}
            every = set().union(*present.values())
            for dimension in self._dimensions:
                missing = every - present[dimension]
                for source in sorted(present, reverse=True):  # widest first
                    found = sorted(missing & present[source])
                    if not found:
                        continue
                    records, vectors = await self._store.retrieve(source, found)
                    if source < dimension:
                        prompts = [
                            self._embedder.prompt(config.instruction, str(r.payload["text"]))
                            for r in records
                        ]
                        vectors = await self._embedder.embed(prompts)
                    await self._store.upsert(
                        dimension,
                        [r.id for r in records],
                        truncate(vectors, dimension),
                        [r.payload for r in records],
                    )
                    missing -= set(found)
                    repaired += len(found)
        return repaired

    async def healthy(self) -> bool:
        """Whether the embedder and the store both answer (for the health service)."""
        if not await self._embedder.ping(within_s=5.0):
            return False
        try:
            await self._store.get_meta(_FINGERPRINT_KEY)
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
            name=validation.classifier_name(request.name),
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
        async with self._create_lock:
            if await self._store.get_meta(classifier_key(config.name)) is not None:
                raise AlreadyExists(f"classifier {config.name!r} already exists")
            await self._store.put_meta(classifier_key(config.name), config.to_payload())
        log.info("created classifier %s", config.name)
        return ClassifierInfo(config, 0)

    async def get_classifier(self, name: str) -> ClassifierInfo:
        config = await self._config(name)
        return ClassifierInfo(config, await self._count(Selection(name)))

    async def list_classifiers(self) -> list[ClassifierInfo]:
        configs = sorted(
            (ClassifierConfig.from_payload(p) for p in await self._store.list_meta("classifier")),
            key=lambda c: c.name,
        )
        return [ClassifierInfo(c, await self._count(Selection(c.name))) for c in configs]

    async def delete_classifier(self, name: str) -> int:
        await self._config(name)
        deleted = await self._delete(Selection(name))
        # The record goes last: if this is interrupted, the classifier still exists and
        # deleting it again finishes the job.
        await self._store.delete_meta(classifier_key(name))
        log.info("deleted classifier %s (%d exemplars)", name, deleted)
        return deleted

    async def _config(self, name: str) -> ClassifierConfig:
        payload = await self._store.get_meta(classifier_key(validation.classifier_name(name)))
        if payload is None:
            raise NotFound(f"classifier {name!r} does not exist")
        return ClassifierConfig.from_payload(payload)

    async def _count(self, selection: Selection) -> int:
        return await self._store.count(self._dimensions[0], selection)

    # Exemplars -------------------------------------------------------------------------------

    async def add_exemplars(self, classifier: str, items: Sequence[ExemplarInput]) -> list[str]:
        """Embeds ``items`` once and writes them to every dimension; returns their ids."""
        validation.batch_size(len(items), self._limits, "exemplars")
        for i, item in enumerate(items):
            validation.text(item.text, self._limits, f"exemplars[{i}].text")
            validation.label(item.label, f"exemplars[{i}].label")
            validation.exemplar_id(item.id, f"exemplars[{i}].id")
            validation.metadata(item.metadata, f"exemplars[{i}].metadata")
        config = await self._config(classifier)

        ids = [item.id or derived_exemplar_id(classifier, item.text) for item in items]
        # A repeated id within the batch: the last occurrence wins, as it would across calls.
        latest = {exemplar_id: i for i, exemplar_id in enumerate(ids)}
        chosen = sorted(latest.values())
        await self._check_room(classifier, len(chosen))
        now = time.time()
        point_ids = [_point_id(classifier, ids[i]) for i in chosen]
        payloads = [
            {
                "classifier": classifier,
                "id": ids[i],
                "label": items[i].label,
                "text": items[i].text,
                "metadata": dict(items[i].metadata),
                "created_at": now,
            }
            for i in chosen
        ]
        prompts = [self._embedder.prompt(config.instruction, items[i].text) for i in chosen]
        vectors = await self._embedder.embed(prompts)
        await self._write_everywhere(classifier, point_ids, vectors, payloads)
        return ids

    async def _write_everywhere(
        self,
        classifier: str,
        point_ids: list[str],
        vectors: Matrix,
        payloads: list[dict[str, Any]],
    ) -> None:
        """Writes the points to every dimension, or (best effort) to none.

        If a dimension fails, the points this call created are deleted again from the
        dimensions already written, so no new exemplar is left half-present. Points that existed
        before keep the new version where it was written. If the rollback itself fails, start-up
        repair completes the leftovers in every dimension instead.
        """
        existing, _ = await self._store.scroll(
            self._dimensions[0], Selection(classifier, ids=point_ids), len(point_ids), None
        )
        created = sorted(set(point_ids) - {record.id for record in existing})
        written: list[int] = []
        try:
            for dimension in self._dimensions:
                await self._store.upsert(
                    dimension, point_ids, truncate(vectors, dimension), payloads
                )
                written.append(dimension)
        except Unavailable:
            if created:
                try:
                    for dimension in written:
                        await self._store.delete(dimension, Selection(classifier, ids=created))
                except Unavailable:
                    log.warning(
                        "rollback of %d new exemplars failed; repair at start-up", len(created)
                    )
            raise

    async def _check_room(self, classifier: str, adding: int) -> None:
        """Refuses a batch that could take the classifier past its exemplar limit.

        Counts the batch as all new (some may update existing exemplars), so the limit is never
        passed, at the price of refusing a batch that would have just fitted.
        """
        limit = self._limits.max_exemplars_per_classifier
        held = await self._count(Selection(classifier))
        if held + adding > limit:
            raise ResourceExhausted(
                f"classifier {classifier!r} holds {held} exemplars; adding {adding} could pass "
                f"the limit of {limit} exemplars per classifier"
            )

    async def delete_exemplars(
        self, classifier: str, ids: Sequence[str] = (), label: str = ""
    ) -> int:
        if bool(ids) == bool(label):
            raise InvalidArgument("give either ids or a label, not both and not neither")
        await self._config(classifier)
        if ids:
            for i, exemplar_id in enumerate(ids):
                validation.exemplar_id(exemplar_id, f"ids[{i}]")
            point_ids = [_point_id(classifier, exemplar_id) for exemplar_id in ids]
            return await self._delete(Selection(classifier, ids=point_ids))
        return await self._delete(Selection(classifier, label=validation.label(label)))

    async def _delete(self, selection: Selection) -> int:
        count = await self._count(selection)
        for dimension in self._dimensions:
            await self._store.delete(dimension, selection)
        return count

    async def list_exemplars(
        self, classifier: str, page_size: int | None, page_token: str, label: str
    ) -> tuple[list[Exemplar], str]:
        limit = _DEFAULT_PAGE_SIZE if page_size is None else page_size
        if not 1 <= limit <= self._limits.max_page_size:
            raise InvalidArgument(
                f"page_size={limit} is out of range; use 1 to {self._limits.max_page_size}"
            )
        offset = _parse_page_token(page_token)
        await self._config(classifier)
        selection = Selection(classifier, label=validation.label(label) if label else None)
        records, next_offset = await self._store.scroll(
            self._dimensions[0], selection, limit, offset
        )
        return [_exemplar(record) for record in records], next_offset or ""

    async def list_labels(self, classifier: str) -> list[tuple[str, int]]:
        await self._config(classifier)
        counts = await self._store.label_counts(self._dimensions[0], classifier)
        return sorted(counts.items(), key=lambda item: (-item[1], item[0]))

    # Classification --------------------------------------------------------------------------

    async def classify(
        self, classifier: str, texts: Sequence[str], options: ClassifyOptions
    ) -> list[Vote | InvalidArgument]:
        """Classifies ``texts`` with one embedding call and one batched store query.

        A text that is invalid, or that the embedding model rejects, gets its InvalidArgument in
        its slot instead of a vote, and the others are classified; any other failure fails the
        whole call.
        """
        validation.batch_size(len(texts), self._limits, "texts")
        config = await self._config(classifier)
        k = validation.k(_either(options.k, config.k), self._limits)
        dimension = validation.dimension(
            _either(options.dimension, config.dimension or self._dimensions[-1]), self._dimensions
        )
        voting = options.voting or config.voting
        temperature = validation.temperature(_either(options.temperature, config.temperature))
        min_similarity = validation.fraction(
            _either(options.min_similarity, config.min_similarity), "min_similarity", -1, 1
        )
        min_confidence = validation.fraction(
            _either(options.min_confidence, config.min_confidence), "min_confidence", 0, 1
        )
        # The calibration was fitted for the classifier's own settings; others get raw shares.
        own = (
            config.k,
            config.voting,
            config.dimension or self._dimensions[-1],
            config.temperature,
        )
        calibration = config.calibration if (k, voting, dimension, temperature) == own else None

        answers: list[Vote | InvalidArgument | None] = [None] * len(texts)
        valid: list[int] = []
        for i, text in enumerate(texts):
            try:
                validation.text(text, self._limits, "text" if len(texts) == 1 else f"texts[{i}]")
                valid.append(i)
            except InvalidArgument as invalid:
                answers[i] = invalid
        prompts = [self._embedder.prompt(config.instruction, texts[i]) for i in valid]
        embedded, vectors, rejected = await self._embed_isolating_rejects(prompts)
        for j, rejection in rejected.items():
            answers[valid[j]] = rejection
        if embedded:
            queries = truncate(vectors, dimension)
            results = await self._queries.query(dimension, classifier, queries, k)
            if not results[0]:
                raise FailedPrecondition(
                    f"classifier {classifier!r} has no exemplars; add some with AddExemplars"
                )
            with tracing.span("vote"):
                tracing.annotate(voting=voting.value, texts=len(results))
                labels: list[str] = []
                by_label = np.empty((len(queries), 0), dtype=np.float32)
                if voting in LABEL_SCORED:
                    fit = label_models.FIT[voting]
                    model = await self._store.label_model(dimension, classifier, fit)
                    labels, by_label = model.labels, model.scores(queries)
                for j, hits in enumerate(results):
                    neighbours = [_neighbour(hit) for hit in hits]
                    answers[valid[embedded[j]]] = vote(
                        neighbours,
                        voting,
                        min_similarity,
                        min_confidence,
                        temperature,
                        calibration,
                        list(zip(labels, by_label[j].tolist(), strict=True)),
                    )
        return [a for a in answers if a is not None]

    async def _embed_isolating_rejects(
        self, prompts: Sequence[str]
    ) -> tuple[list[int], Matrix, dict[int, InvalidArgument]]:
        """Embeds ``prompts`` together; if the model rejects the batch, finds the culprits.

        Returns the positions embedded, their vectors (row i for position i of the list) and the
        rejection of each other position. SGLang rejects a whole batch for one bad text, so a
        rejected batch is retried one text per call.
        """
        if not prompts:
            return [], np.empty((0, 0), dtype=np.float32), {}
        try:
            every = await self._embedder.embed(prompts, self._coalescer.embed)
            return list(range(len(prompts))), every, {}
        except InvalidArgument as whole:
            if len(prompts) == 1:
                return [], np.empty((0, 0), dtype=np.float32), {0: whole}
        rows: dict[int, Matrix] = {}
        rejected: dict[int, InvalidArgument] = {}
        for j, prompt in enumerate(prompts):
            try:
                rows[j] = await self._embedder.embed([prompt], self._coalescer.embed)
            except InvalidArgument as one:
                rejected[j] = one
        embedded = sorted(rows)
        vectors = np.vstack([rows[j] for j in embedded]) if embedded else np.empty((0, 0))
        return embedded, vectors.astype(np.float32, copy=False), rejected

    # Evaluation ------------------------------------------------------------------------------

    async def evaluate(
        self, classifier: str, request: EvaluateRequest
    ) -> tuple[list[Report], list[str], ClassifierInfo]:
        """Scores every setting of the sweep, best first; see the Evaluate RPC."""
        config = await self._config(classifier)
        reports, unknown_labels, config, count = await self._evaluator.evaluate(config, request)
        return reports, unknown_labels, ClassifierInfo(config, count)


def _either(override: T | None, default: T) -> T:
    return default if override is None else override


def _neighbour(record: Record) -> Neighbour:
    payload = record.payload
    return Neighbour(str(payload["id"]), str(payload["label"]), str(payload["text"]), record.score)


def _exemplar(record: Record) -> Exemplar:
    payload = record.payload
    return Exemplar(
        id=str(payload["id"]),
        text=str(payload["text"]),
        label=str(payload["label"]),
        metadata={str(k): str(v) for k, v in (payload.get("metadata") or {}).items()},
        created_at=float(payload.get("created_at", 0.0)),
    )


def _parse_page_token(token: str) -> str | None:
    if not token:
        return None
    try:
        return str(uuid.UUID(token))
    except ValueError:
        raise InvalidArgument("invalid page_token; pass next_page_token unchanged") from None
