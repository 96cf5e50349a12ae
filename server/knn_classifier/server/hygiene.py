"""The exemplar hygiene report (CheckExemplars): what in a classifier's exemplars costs accuracy.

From one leave-one-out pass under the classifier's own settings (the neighbours and votes of
:mod:`evaluation`, as Evaluate measures them): exemplars the others confidently give another
label (likely mislabelled), near-duplicates across labels, label pairs taken for each other,
and labels with too few exemplars; and in-scope exemplars whose nearest exemplar is a negative
(:mod:`negatives`), which the veto answers unknown. Fixing these is the cheapest way for a user
to raise accuracy. The work is bounded like Evaluate's leave-one-out: a classifier larger than
``limits.max_evaluated`` is checked on a fixed random sample of that many exemplars, each
against all the others, off the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from . import evaluate, label_models, negatives, paging, validation, wire_size
from .calibration import Calibration
from .domain import ClassifierConfig
from .errors import FailedPrecondition, InvalidArgument, Reason
from .evaluate import Exemplars, Setting, stored_exemplars
from .settings import Settings
from .store import Store
from .vectors import Matrix

DUPLICATE_NEIGHBOURS = 20
"""Near-duplicates are looked for among each checked exemplar's this many nearest."""

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, slots=True)
class CheckRequest:
    min_confidence: float = 0.5
    min_duplicate_similarity: float = 0.95
    min_label_exemplars: int = 5
    max_items: int = 0
    """Items per list; 0: the default page size."""


@dataclasses.dataclass(frozen=True, slots=True)
class ExemplarRef:
    id: str
    text: str
    label: str


@dataclasses.dataclass(frozen=True, slots=True)
class Mislabelled:
    exemplar: ExemplarRef
    voted_label: str
    confidence: float


@dataclasses.dataclass(frozen=True, slots=True)
class Duplicate:
    first: ExemplarRef
    second: ExemplarRef
    similarity: float


@dataclasses.dataclass(frozen=True, slots=True)
class Overlap:
    first_label: str
    second_label: str
    first_as_second: int
    second_as_first: int
    first_errors_share: float
    """Of first_label's leave-one-out errors, the share that went to second_label."""
    second_errors_share: float
    centroid_similarity: float


@dataclasses.dataclass(frozen=True, slots=True)
class Report:
    mislabelled: list[Mislabelled]
    """Most confident first."""
    duplicates: list[Duplicate]
    """Most similar first."""
    overlaps: list[Overlap]
    """Most confusions first."""
    small_labels: list[tuple[str, int]]
    """(label, exemplar count), fewest first."""
    found: tuple[int, int, int, int]
    """How many of each of the four lists there are in all (the lists may be cut short)."""
    checked: int
    exemplar_count: int
    setting: Setting
    nearest_negative: list[ExemplarRef] = dataclasses.field(default_factory=list)
    """Checked exemplars a negative vetoes, the most similar to it first."""
    nearest_negative_found: int = 0
    negatives: int = 0
    """The classifier's negative exemplars (not in ``exemplar_count``)."""


def report(
    exemplars: Exemplars,
    sample: npt.NDArray[np.intp],
    setting: Setting,
    calibration: Calibration | None,
    request: CheckRequest,
) -> Report:
    """The full report of ``exemplars``, leaving out each of the ``sample`` rows in turn."""
    queries = exemplars.vectors[sample]
    indices, similarities = evaluate.nearest(
        queries, exemplars.vectors, max(setting.k, DUPLICATE_NEIGHBOURS), sample
    )
    scores = (
        evaluate.label_scores(setting.voting, exemplars, queries, sample)
        if setting.voting in label_models.FIT  # mixture's discriminant part too
        else None
    )
    outcomes = evaluate.outcomes(
        exemplars, indices, similarities, setting, calibration=calibration, label_scores=scores
    )
    truth = [exemplars.labels[i] for i in sample.tolist()]
    voted = [o.best_label for o in outcomes]

    mislabelled = sorted(
        (
            Mislabelled(_ref(exemplars, i), o.best_label, o.confidence)
            for i, o in zip(sample.tolist(), outcomes, strict=True)
            if o.best_label is not None
            and o.best_label != exemplars.labels[i]
            and o.confidence >= request.min_confidence
        ),
        key=lambda m: (-m.confidence, m.exemplar.id),
    )
    duplicates = _duplicates(exemplars, sample, indices, similarities, request)
    overlaps = _overlaps(exemplars, truth, voted)
    counts = Counter(exemplars.labels)
    small = sorted(
        ((label, n) for label, n in counts.items() if n < request.min_label_exemplars),
        key=lambda item: (item[1], item[0]),
    )
    vetoed = _vetoed(exemplars, sample, queries, similarities)
    return Report(
        mislabelled,
        duplicates,
        overlaps,
        small,
        (len(mislabelled), len(duplicates), len(overlaps), len(small)),
        len(sample),
        len(exemplars.ids) + len(exemplars.negatives),
        setting,
        vetoed,
        len(vetoed),
        len(exemplars.negatives),
    )


def _vetoed(
    exemplars: Exemplars, sample: npt.NDArray[np.intp], queries: Matrix, similarities: Matrix
) -> list[ExemplarRef]:
    """The checked exemplars whose nearest negative is at least as similar as their nearest
    other in-scope exemplar, the most similar to their negative first."""
    if not len(exemplars.negatives):
        return []
    nearest_negative = negatives.nearest_similarity(queries, exemplars.negatives)
    vetoed = np.flatnonzero(negatives.veto_mask(similarities[:, 0], nearest_negative))
    ordered = sorted(vetoed.tolist(), key=lambda row: (-nearest_negative[row], int(sample[row])))
    return [_ref(exemplars, int(sample[row])) for row in ordered]


def _ref(exemplars: Exemplars, i: int) -> ExemplarRef:
    return ExemplarRef(exemplars.ids[i], exemplars.texts[i], exemplars.labels[i])


def _duplicates(
    exemplars: Exemplars,
    sample: npt.NDArray[np.intp],
    indices: npt.NDArray[np.intp],
    similarities: Matrix,
    request: CheckRequest,
) -> list[Duplicate]:
    """Pairs of different labels among the checked exemplars' nearest, at least
    ``min_duplicate_similarity`` alike, each pair once."""
    _, codes = np.unique(np.asarray(exemplars.labels, dtype=object), return_inverse=True)
    close = (similarities >= request.min_duplicate_similarity) & (
        codes[indices] != codes[sample][:, None]
    )
    rows, columns = np.nonzero(close)
    pairs: dict[tuple[int, int], float] = {}
    for row, column in zip(rows.tolist(), columns.tolist(), strict=True):
        a, b = int(sample[row]), int(indices[row, column])
        pairs[(min(a, b), max(a, b))] = float(similarities[row, column])
    ordered = sorted(
        pairs.items(), key=lambda item: (-item[1], exemplars.ids[item[0][0]], item[0][1])
    )
    return [Duplicate(_ref(exemplars, a), _ref(exemplars, b), s) for (a, b), s in ordered]


def _overlaps(
    exemplars: Exemplars, truth: Sequence[str], voted: Sequence[str | None]
) -> list[Overlap]:
    """Label pairs that leave-one-out takes for each other, with their centroids' similarity."""
    errors = Counter((t, v) for t, v in zip(truth, voted, strict=True) if v is not None and v != t)
    wrong = Counter(t for t, _ in errors.elements())
    pairs = sorted({(min(t, v), max(t, v)) for t, v in errors})
    if not pairs:
        return []
    labels, codes = np.unique(np.asarray(exemplars.labels, dtype=object), return_inverse=True)
    sums = np.zeros((len(labels), exemplars.vectors.shape[1]), dtype=np.float64)
    np.add.at(sums, codes, exemplars.vectors)
    centroids = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    position = {str(label): i for i, label in enumerate(labels)}
    overlaps = [
        Overlap(
            a,
            b,
            errors[(a, b)],
            errors[(b, a)],
            errors[(a, b)] / wrong[a] if wrong[a] else 0.0,
            errors[(b, a)] / wrong[b] if wrong[b] else 0.0,
            float(centroids[position[a]] @ centroids[position[b]]),
        )
        for a, b in pairs
    ]
    overlaps.sort(key=lambda o: -(o.first_as_second + o.second_as_first))  # stable: by labels
    return overlaps


def _leading(
    items: list[T], size: Callable[[T], int], limit: int, room: int
) -> tuple[list[T], int]:
    """The first ``items`` (at most ``limit``) that fit in ``room`` bytes, and the room left."""
    kept = []
    for item in items[:limit]:
        cost = size(item)
        if cost > room:
            break
        kept.append(item)
        room -= cost
    return kept, room


class Checker:
    """Builds reports for the service: loads the exemplars, bounds the work and the response."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._store = store

    async def check(self, config: ClassifierConfig, request: CheckRequest) -> Report:
        """The report of ``config``'s exemplars, its lists cut to ``max_items`` and to the
        response budget (in the order of the response's fields)."""
        validation.fraction(request.min_confidence, "min_confidence", 0, 1)
        validation.fraction(request.min_duplicate_similarity, "min_duplicate_similarity", -1, 1)
        if request.min_label_exemplars < 0:
            raise _negative("min_label_exemplars", request.min_label_exemplars)
        if request.max_items < 0:
            raise _negative("max_items", request.max_items)
        limit = paging.page_size(request.max_items, self._limits)

        dimension = config.dimension or self._dimensions[-1]
        exemplars = await stored_exemplars(self._store, config.name, dimension)
        if len(exemplars.ids) < 2 or len(set(exemplars.labels)) < 2:
            raise FailedPrecondition(
                f"classifier {config.name!r} has {len(exemplars.ids)} exemplars in "
                f"{len(set(exemplars.labels))} labels; checking needs at least two of each"
            )
        count = min(len(exemplars.ids), self._limits.max_evaluated)
        sample = np.sort(np.random.default_rng(0).choice(len(exemplars.ids), count, False))
        setting = Setting(config.k, config.voting, dimension, config.temperature)
        full = await asyncio.to_thread(
            report, exemplars, sample.astype(np.intp), setting, config.calibration, request
        )
        room = self._limits.max_response_bytes - paging.ENVELOPE_BYTES
        mislabelled, room = _leading(full.mislabelled, wire_size.mislabelled, limit, room)
        duplicates, room = _leading(full.duplicates, wire_size.duplicate, limit, room)
        overlaps, room = _leading(full.overlaps, wire_size.overlap, limit, room)
        small, room = _leading(
            full.small_labels, lambda item: wire_size.label_count(item[0]), limit, room
        )
        vetoed, room = _leading(full.nearest_negative, wire_size.checked_exemplar, limit, room)
        return dataclasses.replace(
            full,
            mislabelled=mislabelled,
            duplicates=duplicates,
            overlaps=overlaps,
            small_labels=small,
            nearest_negative=vetoed,
        )


def _negative(name: str, value: int) -> InvalidArgument:
    return InvalidArgument(
        f"{name}={value} is negative; use 0 or more",
        reason=Reason.VALUE_OUT_OF_RANGE,
        metadata={"minimum": "0"},
        field=name,
    )
