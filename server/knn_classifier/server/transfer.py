"""Carrying a classifier between deployments: what is valid on arrival, and given vectors.

Shared by ``knn-classifier-migrate`` (store to store) and the API's export and import fields
(ListExemplars' vectors, CreateClassifier's calibration and out-of-scope threshold, AddExemplars'
vectors), so that both follow one rule: vectors, a calibration and an out-of-scope threshold
only mean something for the embedder that made them. They are accepted only with that
embedder's fingerprint; a calibration only at the dimension it was fitted at, an out-of-scope
threshold only at a dimension kept here; vectors only if wide enough for every dimension kept
here, each dimension taking its own vector or the Matryoshka truncation of a wider one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import out_of_scope, validation
from .calibration import Calibration
from .domain import ClassifierConfig, Exemplar, ExemplarInput, NewClassifier
from .errors import FailedPrecondition, InvalidArgument, Reason
from .out_of_scope import OutOfScopeFit
from .store import Store
from .vectors import Fingerprint, Matrix, truncate, usable_rows
from .voting import LABEL_TEMPERATURE

MAX_CALIBRATION_POINTS = 64
"""As many points as :meth:`Calibration.fit` keeps."""


def fingerprint_id(fingerprint: Fingerprint) -> str:
    """The opaque form of an embedder's fingerprint that the API shows and compares."""
    key = f"{fingerprint.model}\x00{fingerprint.template}\x00{fingerprint.width}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def check_fingerprint(given: str, fingerprint: Fingerprint, what: str) -> None:
    """Refuses ``what`` (vectors, a calibration) made by an embedder other than ``fingerprint``."""
    if not given:
        raise InvalidArgument(
            f"{what} need embedder_fingerprint: the fingerprint of the embedder that made them",
            reason=Reason.FIELD_REQUIRED,
            field="embedder_fingerprint",
        )
    expected = fingerprint_id(fingerprint)
    if given != expected:
        raise FailedPrecondition(
            f"{what} were made by another embedder (fingerprint {given[:64]!r}) than this "
            f"server's ({expected!r}: model {fingerprint.model!r}, width {fingerprint.width}); "
            "send the exemplars without vectors to have their texts embedded here, and fit the "
            "calibration with Evaluate (apply_best)",
            reason=Reason.EMBEDDER_MISMATCH,
            metadata={"expected": expected, "actual": given[:64]},
        )


# Vectors -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VectorSet:
    """The vectors of a batch of exemplars in one or more dimensions (row i: exemplar i)."""

    by_dimension: Mapping[int, Matrix]

    @classmethod
    def of(cls, vectors: Matrix) -> VectorSet:
        """Vectors of one width, e.g. as the embedder made them."""
        return cls({int(vectors.shape[1]): vectors})

    def at(self, dimension: int) -> Matrix:
        """The unit vectors at ``dimension``: those of that dimension, else the first
        components of the narrowest wider ones, renormalised (Matryoshka truncation)."""
        source = min(d for d in self.by_dimension if d >= dimension)
        return truncate(self.by_dimension[source], dimension)

    def rows(self, index: Sequence[int]) -> VectorSet:
        return VectorSet({d: m[list(index)] for d, m in self.by_dimension.items()})


def given_vectors(
    items: Sequence[ExemplarInput],
    embedder_fingerprint: str,
    fingerprint: Fingerprint,
    dimensions: Sequence[int],
) -> VectorSet | None:
    """The vectors AddExemplars was given with its exemplars, checked; None if it was given
    none (the texts are embedded)."""
    if not any(item.vectors for item in items):
        return None
    check_fingerprint(embedder_fingerprint, fingerprint, "the vectors")
    shape = sorted(d for d, _ in items[0].vectors)
    rows: dict[int, list[Sequence[float]]] = {d: [] for d in shape}
    for i, item in enumerate(items):
        field = f"exemplars[{i}].vectors"
        given = dict(item.vectors)
        if len(given) != len(item.vectors) or sorted(given) != shape:
            raise InvalidArgument(
                f"{field} has dimensions {sorted(d for d, _ in item.vectors)}, exemplars[0] "
                f"{shape}: every exemplar of a request has vectors of the same dimensions, "
                "each once, or none has",
                field=field,
            )
        for j, (dimension, values) in enumerate(item.vectors):
            if not 1 <= dimension <= fingerprint.width or len(values) != dimension:
                raise InvalidArgument(
                    f"{field}[{j}] has {len(values)} values for dimension {dimension}; a vector "
                    f"has as many values as its dimension, at most {fingerprint.width}",
                    reason=Reason.VALUE_OUT_OF_RANGE,
                    field=f"{field}[{j}]",
                )
            rows[dimension].append(values)
    widest = shape[-1]
    narrow = [d for d in dimensions if d > widest]
    if narrow:
        raise FailedPrecondition(
            f"the vectors given go up to dimension {widest}, but this server also keeps "
            f"dimension {narrow[0]}: send vectors of dimension {narrow[-1]} or wider, or the "
            "exemplars without vectors to have their texts embedded here",
            reason=Reason.VECTORS_TOO_NARROW,
            metadata={"dimension": narrow[0], "widest": widest},
        )
    matrices = {d: np.asarray(rows[d], dtype=np.float32) for d in shape}
    for dimension, matrix in matrices.items():
        bad = np.flatnonzero(~usable_rows(matrix))
        if bad.size:
            i = int(bad[0])
            raise InvalidArgument(
                f"exemplars[{i}] has a vector of dimension {dimension} that is zero or not finite",
                field=f"exemplars[{i}].vectors",
            )
    return VectorSet(matrices)


def vector_dimensions(requested: Sequence[int], dimensions: Sequence[int]) -> list[int]:
    """The dimensions ListExemplars returns vectors of: those requested, each kept here;
    none requested: all."""
    for i, dimension in enumerate(requested):
        validation.dimension(dimension, dimensions, f"vector_dimensions[{i}]")
    return sorted(set(requested)) if requested else list(dimensions)


async def with_vectors(
    store: Store, exemplars: Sequence[Exemplar], point_ids: Sequence[str], dimensions: list[int]
) -> list[Exemplar]:
    """``exemplars`` (stored as ``point_ids``) with their vectors of ``dimensions``; those gone
    from a dimension meanwhile (deleted since they were listed) are left out."""
    found: dict[str, dict[int, Sequence[float]]] = {point: {} for point in point_ids}
    for dimension in dimensions:
        records, vectors = await store.retrieve(dimension, list(point_ids))
        for record, vector in zip(records, vectors, strict=True):
            found[record.id][dimension] = vector.tolist()  # protobuf takes lists far faster
    return [
        dataclasses.replace(exemplar, vectors=found[point])
        for exemplar, point in zip(exemplars, point_ids, strict=True)
        if len(found[point]) == len(dimensions)
    ]


# Calibration ---------------------------------------------------------------------------------


def restored_calibration(request: NewClassifier, fingerprint: Fingerprint) -> Calibration | None:
    """CreateClassifier's calibration to restore, checked; None if none was given."""
    calibration = request.calibration
    if calibration is None:
        return None
    check_fingerprint(request.embedder_fingerprint, fingerprint, "the calibration's vote shares")
    if not request.dimension:
        raise InvalidArgument(
            "a calibration holds for the dimension it was fitted at: set dimension to it",
            reason=Reason.FIELD_REQUIRED,
            field="dimension",
        )
    x, y = list(calibration.shares), list(calibration.probabilities)
    valid = (
        len(x) == len(y)
        and 1 <= len(x) <= MAX_CALIBRATION_POINTS
        and all(math.isfinite(v) and 0 <= v <= 1 for v in x + y)
        and all(a <= b for a, b in itertools.pairwise(x))
    )
    if not valid:
        raise InvalidArgument(
            "calibration must have 1 to 64 shares, ascending, and as many probabilities, all "
            "in [0, 1]; pass Classifier.calibration as it was exported",
            field="calibration",
        )
    return Calibration(tuple(x), tuple(y))


def restored_label_temperature(request: NewClassifier) -> float:
    """The label models' temperature to restore with CreateClassifier's calibration, checked:
    the calibration maps shares made at it. The default without a calibration, or from an export
    made before it was carried."""
    if request.calibration is None or request.label_temperature is None:
        return LABEL_TEMPERATURE
    return validation.temperature(request.label_temperature, "calibration.label_temperature")


# Out-of-scope rule ---------------------------------------------------------------------------


def restored_out_of_scope(
    request: NewClassifier, fingerprint: Fingerprint, dimensions: Sequence[int]
) -> OutOfScopeFit | None:
    """CreateClassifier's out-of-scope rule to restore, checked like a calibration (the
    embedder that made the scores it holds, a dimension kept here, values in range); None if
    none was given."""
    rule = request.out_of_scope
    if rule is None:
        return None
    check_fingerprint(
        request.embedder_fingerprint, fingerprint, "the out-of-scope threshold's scores"
    )
    field = "out_of_scope_threshold"
    if rule.dimension not in dimensions:
        raise InvalidArgument(
            f"{field}.dimension is {rule.dimension}, a dimension this server does not keep "
            f"({', '.join(map(str, dimensions))}): leave the threshold out and fit one here with "
            "Evaluate (apply_best)",
            reason=Reason.DIMENSION_NOT_CONFIGURED,
            field=f"{field}.dimension",
        )
    validation.fraction(rule.target_coverage, f"{field}.target_coverage", 0.5, 1)
    validation.fraction(rule.coverage, f"{field}.coverage", 0, 1)
    references = (rule.similarity, rule.mahalanobis, rule.agreement)
    valid = (
        math.isfinite(rule.threshold)
        and rule.threshold <= 0  # a sum of log p-values
        and all(1 <= len(r) <= out_of_scope.REFERENCE_POINTS for r in references[:2])
        and len(rule.agreement) <= out_of_scope.REFERENCE_POINTS  # empty in older rules
        and all(math.isfinite(v) for r in references for v in r)
        and all(a <= b for r in references for a, b in itertools.pairwise(r))
        and all(-2 <= v <= 2 for v in rule.similarity)  # a difference of two cosines
        and all(0 <= v <= 1 for v in rule.agreement)  # a share of neighbours
        and (rule.reference_size == 0 or rule.reference_size >= max(map(len, references)))
    )
    if not valid:
        raise InvalidArgument(
            f"{field} must have a finite threshold of at most 0 and 1 to "
            f"{out_of_scope.REFERENCE_POINTS} finite reference values of each score (the "
            "agreement's may be empty), ascending, similarities within [-2, 2], agreements "
            "within [0, 1], and a reference_size of 0 or at least as many values; pass "
            "Classifier.out_of_scope_threshold as it was exported",
            field=field,
        )
    return rule


def carried(
    config: ClassifierConfig, dimensions: Sequence[int], same_vectors: bool, source_widest: int
) -> tuple[ClassifierConfig, tuple[str, ...]]:
    """A classifier record as it can arrive in a deployment keeping ``dimensions`` (the
    migration's copy), and what had to change in it.

    The calibration maps vote shares to probabilities for the old vectors at the default
    dimension (``source_widest`` where it is 0): it is dropped when either changes here (as
    UpdateClassifier drops it). The out-of-scope rule holds the old vectors' scores at its
    dimension: dropped with other vectors or without that dimension. The thresholds are the
    user's and are kept, but they too were chosen for the old vectors.
    """
    notes = []
    fitted_at = config.dimension or source_widest
    if config.dimension and config.dimension not in dimensions:
        notes.append(
            f"its default dimension {config.dimension} is not configured here: it now "
            "classifies at the largest dimension"
        )
        config = dataclasses.replace(config, dimension=0)
    calibration_holds = same_vectors and fitted_at in dimensions
    if not calibration_holds:  # and the label models' temperature it was fitted with
        config = dataclasses.replace(config, calibration=None, label_temperature=LABEL_TEMPERATURE)
    elif config.calibration is not None and fitted_at != max(dimensions):
        config = dataclasses.replace(config, dimension=fitted_at)  # where it was fitted
    rule = config.out_of_scope
    if rule is not None and not (same_vectors and rule.dimension in dimensions):
        config = dataclasses.replace(config, out_of_scope=None)
    if notes or not calibration_holds:
        notes.append(
            "its calibration and out-of-scope threshold (dropped) and thresholds were fitted to "
            f"the old vectors: run `knn-classifier evaluate {config.name} --apply-best` to fit "
            "them again"
        )
    return config, tuple(notes)
