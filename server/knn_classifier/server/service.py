"""The transport-free core: classifiers, exemplars and classification over an embedder and a store.

Knows nothing of gRPC: it takes and returns domain types and raises the errors of ``errors``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from . import deadlines, evaluation, validation
from .domain import (
    ClassifierConfig,
    ClassifierInfo,
    ClassifyOptions,
    EvaluateRequest,
    Exemplar,
    ExemplarInput,
    NewClassifier,
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
from .evaluation import Exemplars, Outcome, Report, Setting
from .settings import Settings
from .store import Record, Selection, Store
from .voting import Calibration, Neighbour, Vote, Voting, vote

log = logging.getLogger(__name__)

_ID_NAMESPACE = uuid.UUID("0f4a6c1e-2b7d-4e58-9a31-6c8e2d5b7f90")
_FINGERPRINT_KEY = "embedder-fingerprint"
_DEFAULT_PAGE_SIZE = 100

T = TypeVar("T")


def _classifier_key(name: str) -> str:
    return f"classifier:{name}"


def derived_exemplar_id(classifier: str, text: str) -> str:
    """The id of an exemplar added without one: adding the same text again updates it."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"text\x00{classifier}\x00{text}"))


def _point_id(classifier: str, exemplar_id: str) -> str:
    """The store's point id: exemplar ids are per classifier, point ids are global UUIDs."""
    return str(uuid.uuid5(_ID_NAMESPACE, f"point\x00{classifier}\x00{exemplar_id}"))


class ClassifierService:
    def __init__(self, settings: Settings, embedder: Embedder, store: Store) -> None:
        self._settings = settings
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store
        self._create_lock = asyncio.Lock()

    @property
    def dimensions(self) -> list[int]:
        return list(self._dimensions)

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
            if await self._store.get_meta(_classifier_key(config.name)) is not None:
                raise AlreadyExists(f"classifier {config.name!r} already exists")
            await self._store.put_meta(_classifier_key(config.name), config.to_payload())
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
        await self._store.delete_meta(_classifier_key(name))
        log.info("deleted classifier %s (%d exemplars)", name, deleted)
        return deleted

    async def _config(self, name: str) -> ClassifierConfig:
        payload = await self._store.get_meta(_classifier_key(validation.classifier_name(name)))
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
        await self._check_room(classifier, len(items))

        ids = [item.id or derived_exemplar_id(classifier, item.text) for item in items]
        # A repeated id within the batch: the last occurrence wins, as it would across calls.
        latest = {exemplar_id: i for i, exemplar_id in enumerate(ids)}
        chosen = sorted(latest.values())
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
        before keep the new version where it was written; start-up repair completes any that an
        interrupted rollback leaves behind.
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
    ) -> list[Vote]:
        """Classifies ``texts`` with one embedding call and one batched store query."""
        validation.batch_size(len(texts), self._limits, "texts")
        for i, text in enumerate(texts):
            validation.text(text, self._limits, "text" if len(texts) == 1 else f"texts[{i}]")
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

        prompts = [self._embedder.prompt(config.instruction, text) for text in texts]
        vectors = truncate(await self._embedder.embed(prompts), dimension)
        results = await self._store.query(dimension, classifier, vectors, k)
        if not results or not results[0]:
            raise FailedPrecondition(
                f"classifier {classifier!r} has no exemplars; add some with AddExemplars"
            )
        # The calibration was fitted for the classifier's own settings; others get raw shares.
        calibration = (
            config.calibration
            if (k, voting, dimension, temperature)
            == (
                config.k,
                config.voting,
                config.dimension or self._dimensions[-1],
                config.temperature,
            )
            else None
        )
        return [
            vote(
                [_neighbour(hit) for hit in hits],
                voting,
                min_similarity,
                min_confidence,
                temperature,
                calibration,
            )
            for hits in results
        ]

    # Evaluation ------------------------------------------------------------------------------

    async def evaluate(
        self, classifier: str, request: EvaluateRequest
    ) -> tuple[list[Report], list[str], ClassifierInfo]:
        """Scores every setting of the sweep, best first; see the Evaluate RPC."""
        config = await self._config(classifier)
        sweep = self._sweep(config, request)
        held_out = request.held_out
        if len(held_out) > self._limits.max_evaluated:
            raise InvalidArgument(
                f"{len(held_out)} held-out texts; the limit is {self._limits.max_evaluated}"
            )
        for i, (text, label) in enumerate(held_out):
            validation.text(text, self._limits, f"held_out[{i}].text")
            validation.label(label, f"held_out[{i}].label")
        if request.apply_best and held_out:
            raise InvalidArgument("apply_best fits from leave-one-out: send no held_out texts")
        if request.target_precision is not None and not request.apply_best:
            raise InvalidArgument("target_precision needs apply_best")
        if request.target_precision is not None:
            validation.fraction(request.target_precision, "target_precision", 0.01, 1)

        stored = {d: await self._exemplars(classifier, d) for d in {s.dimension for s in sweep}}
        some = next(iter(stored.values()))
        if len(some.ids) < 2 or len(set(some.labels)) < 2:
            raise FailedPrecondition(
                f"classifier {classifier!r} has {len(some.ids)} exemplars in "
                f"{len(set(some.labels))} labels; evaluating needs at least two of each"
            )
        if held_out:
            prompts = [self._embedder.prompt(config.instruction, text) for text, _ in held_out]
            embedded = await self._embedder.embed(prompts)
            truth = [label for _, label in held_out]
            sample_ids: list[str] = []
        else:
            rng = np.random.default_rng(0)
            count = min(len(some.ids), self._limits.max_evaluated)
            sample_ids = [some.ids[i] for i in sorted(rng.choice(len(some.ids), count, False))]
            by_id = dict(zip(some.ids, some.labels, strict=True))
            truth = [by_id[i] for i in sample_ids]

        results: list[Evaluated] = []
        largest_k = max(s.k for s in sweep)
        for dimension, exemplars in stored.items():
            if held_out:
                queries, self_index = truncate(embedded, dimension), None
            else:
                position = {exemplar_id: i for i, exemplar_id in enumerate(exemplars.ids)}
                self_index = np.asarray([position[i] for i in sample_ids], dtype=np.intp)
                queries = exemplars.vectors[self_index]
            indices, similarities = await asyncio.to_thread(
                evaluation.nearest, queries, exemplars.vectors, largest_k, self_index
            )
            for setting in (s for s in sweep if s.dimension == dimension):
                deadlines.check("the next setting of the sweep")
                outcomes, raw_shares = await asyncio.to_thread(
                    self._outcomes,
                    config,
                    setting,
                    exemplars,
                    indices,
                    similarities,
                    truth,
                    bool(held_out),
                )
                report = evaluation.report(setting, truth, outcomes)
                results.append(Evaluated(report, outcomes, raw_shares))
        results.sort(key=lambda r: (-r.report.accuracy, -r.report.macro_f1))

        if request.apply_best:
            config = await self._apply(config, results[0], truth, request.target_precision)
        unknown_labels = sorted(set(truth) - set(some.labels)) if held_out else []
        info = ClassifierInfo(config, len(some.ids))
        return [r.report for r in results], unknown_labels, info

    def _sweep(self, config: ClassifierConfig, request: EvaluateRequest) -> list[Setting]:
        ks = [validation.k(k, self._limits) for k in request.k] or [config.k]
        votings = request.voting or [config.voting]
        dimensions = [validation.dimension(d, self._dimensions) for d in request.dimension] or [
            config.dimension or self._dimensions[-1]
        ]
        temperatures = [validation.temperature(t) for t in request.temperature] or [
            config.temperature
        ]
        sweep = list(
            dict.fromkeys(
                Setting(k, voting, dimension, t if voting is Voting.SOFTMAX else config.temperature)
                for dimension in dimensions
                for voting in votings
                for k in ks
                for t in temperatures
            )
        )
        if len(sweep) > self._limits.max_sweep:
            raise InvalidArgument(
                f"the sweep has {len(sweep)} settings; the limit is {self._limits.max_sweep}"
            )
        return sweep

    async def _exemplars(self, classifier: str, dimension: int) -> Exemplars:
        records, vectors = await self._store.vectors(dimension, classifier)
        return Exemplars(
            ids=[str(r.payload["id"]) for r in records],
            labels=[str(r.payload["label"]) for r in records],
            texts=[str(r.payload["text"]) for r in records],
            vectors=vectors,
        )

    @staticmethod
    def _outcomes(
        config: ClassifierConfig,
        setting: Setting,
        exemplars: Exemplars,
        indices: npt.NDArray[np.intp],
        similarities: Matrix,
        truth: Sequence[str],
        held_out: bool,
    ) -> tuple[list[Outcome], list[float]]:
        """The answers under ``setting`` with the classifier's thresholds.

        Held out, the classifier's calibration applies if it was fitted for this setting.
        Leave-one-out, confidences are calibrated by two-fold cross-fitting (each half by a
        calibration fitted on the other), which is what apply_best would give, measured honestly.
        Also returns the uncalibrated shares, which apply_best fits its calibration on.
        """
        current = Setting(
            config.k, config.voting, config.dimension or setting.dimension, config.temperature
        )
        calibration = config.calibration if held_out and setting == current else None
        raw = [
            evaluation.outcome(v)
            for v in evaluation.votes(
                exemplars, indices, similarities, setting, config.min_similarity, 0.0, calibration
            )
        ]
        confidences = [o.confidence for o in raw] if held_out else _cross_fitted(raw, truth)
        outcomes = [
            Outcome(
                o.label if c >= config.min_confidence else None, o.best_label, c, o.top_similarity
            )
            for o, c in zip(raw, confidences, strict=True)
        ]
        return outcomes, [o.confidence for o in raw]

    async def _apply(
        self,
        config: ClassifierConfig,
        best: Evaluated,
        truth: Sequence[str],
        target_precision: float | None,
    ) -> ClassifierConfig:
        """Makes the best setting the defaults, with a calibration fitted on all its shares."""
        setting = best.report.setting
        calibration = Calibration.fit(
            best.raw_shares,
            [o.best_label == t for o, t in zip(best.outcomes, truth, strict=True)],
        )
        updated = dataclasses.replace(
            config,
            k=setting.k,
            voting=setting.voting,
            dimension=setting.dimension,
            temperature=setting.temperature,
            calibration=calibration,
        )
        if target_precision is not None:
            outcomes = best.outcomes
            correct = [o.best_label == t for o, t in zip(outcomes, truth, strict=True)]
            updated = dataclasses.replace(
                updated,
                min_confidence=max(
                    0.0,
                    evaluation.threshold_for_precision(
                        [o.confidence for o in outcomes], correct, target_precision
                    ),
                ),
                min_similarity=evaluation.threshold_for_precision(
                    [o.top_similarity for o in outcomes], correct, target_precision
                ),
            )
        await self._store.put_meta(_classifier_key(config.name), updated.to_payload())
        log.info("classifier %s: applied %s", config.name, setting)
        return updated


def _either(override: T | None, default: T) -> T:
    return default if override is None else override


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluated:
    """One setting's report, its answers, and their uncalibrated shares."""

    report: Report
    outcomes: list[Outcome]
    raw_shares: list[float]


def _cross_fitted(outcomes: Sequence[Outcome], truth: Sequence[str]) -> list[float]:
    """Each half's confidences calibrated by an isotonic map fitted on the other half."""
    shares = [o.confidence for o in outcomes]
    right = [o.best_label == t for o, t in zip(outcomes, truth, strict=True)]
    halves = [list(range(0, len(shares), 2)), list(range(1, len(shares), 2))]
    calibrated = list(shares)
    for fit_on, apply_to in (halves, halves[::-1]):
        if not fit_on:
            continue
        calibration = Calibration.fit([shares[i] for i in fit_on], [right[i] for i in fit_on])
        for i in apply_to:
            calibrated[i] = calibration(shares[i])
    return calibrated


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
