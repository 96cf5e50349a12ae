"""The service's own data types, free of protobuf and of the store's formats."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .calibration import Calibration
from .out_of_scope import OutOfScopeFit
from .settings import LimitSettings
from .store.base import Record
from .voting import LABEL_TEMPERATURE, Voting

T = TypeVar("T")


def either(override: T | None, default: T) -> T:
    """A request's override of a default (None: not given)."""
    return default if override is None else override


def classifier_key(name: str) -> str:
    """The key of a classifier's record among the store's meta records."""
    return f"classifier:{name}"


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """A classifier: its name, the instruction given to the model, and its voting defaults."""

    name: str
    instruction: str
    k: int
    voting: Voting
    min_similarity: float
    min_confidence: float
    created_at: float
    """Seconds since the epoch."""
    temperature: float
    dimension: int = 0
    """The default dimension; 0: the largest configured."""
    calibration: Calibration | None = None
    uid: str = ""
    """This incarnation of the name: a classifier deleted and created again gets a new one.
    Empty for records written before incarnations existed."""
    revision: int = 0
    """Bumped by every write to the classifier: its settings and its exemplars."""
    deleting: bool = False
    """Set while the classifier's exemplars are deleted; the record goes last."""
    out_of_scope: OutOfScopeFit | None = None
    """The out-of-scope rule fitted by Evaluate with apply_best."""
    label_temperature: float = LABEL_TEMPERATURE
    """The discriminant's temperature in mixture voting, fitted by Evaluate with apply_best."""
    holds_negatives: bool = False
    """The classifier may hold negative exemplars: set before the first one is written, cleared
    by a delete that leaves none. Classify looks for the nearest negative only when it is set,
    so a classifier without negatives pays nothing for them."""

    @property
    def etag(self) -> str:
        """The incarnation and revision, as one opaque string (AIP-154)."""
        return f"{self.uid}.{self.revision}"

    def to_payload(self) -> dict[str, Any]:
        calibration = self.calibration
        return {
            "kind": "classifier",
            "name": self.name,
            "instruction": self.instruction,
            "k": self.k,
            "voting": self.voting.value,
            "min_similarity": self.min_similarity,
            "min_confidence": self.min_confidence,
            "created_at": self.created_at,
            "temperature": self.temperature,
            "dimension": self.dimension,
            "calibration": (
                {
                    "shares": list(calibration.shares),
                    "probabilities": list(calibration.probabilities),
                }
                if calibration
                else None
            ),
            "uid": self.uid,
            "revision": self.revision,
            "deleting": self.deleting,
            "out_of_scope": self.out_of_scope.to_payload() if self.out_of_scope else None,
            "label_temperature": self.label_temperature,
            "holds_negatives": self.holds_negatives,
        }

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> ClassifierConfig:
        return cls(
            name=str(payload["name"]),
            instruction=str(payload["instruction"]),
            k=int(payload["k"]),
            voting=Voting(payload["voting"]),
            min_similarity=float(payload["min_similarity"]),
            min_confidence=float(payload["min_confidence"]),
            created_at=float(payload["created_at"]),
            temperature=float(payload["temperature"]),
            dimension=int(payload["dimension"]),
            calibration=(
                Calibration(
                    tuple(payload["calibration"]["shares"]),
                    tuple(payload["calibration"]["probabilities"]),
                )
                if payload.get("calibration")
                else None
            ),
            uid=str(payload.get("uid", "")),
            revision=int(payload.get("revision", 0)),
            deleting=bool(payload.get("deleting", False)),
            out_of_scope=(
                OutOfScopeFit.from_payload(payload["out_of_scope"])
                if payload.get("out_of_scope")
                else None
            ),
            label_temperature=float(payload.get("label_temperature", LABEL_TEMPERATURE)),
            holds_negatives=bool(payload.get("holds_negatives", False)),
        )


@dataclass(frozen=True, slots=True)
class ClassifierInfo:
    config: ClassifierConfig
    exemplar_count: int


@dataclass(frozen=True, slots=True)
class NewClassifier:
    """A CreateClassifier request; None fields take the server's defaults."""

    name: str
    instruction: str = ""
    k: int | None = None
    voting: Voting | None = None
    min_similarity: float | None = None
    min_confidence: float | None = None
    temperature: float | None = None
    dimension: int | None = None
    calibration: Calibration | None = None
    """To restore, with ``embedder_fingerprint`` (see :mod:`transfer`)."""
    embedder_fingerprint: str = ""
    out_of_scope: OutOfScopeFit | None = None
    """To restore, with ``embedder_fingerprint``, like the calibration."""
    label_temperature: float | None = None
    """To restore with the calibration: the label models' temperature it was fitted with."""


@dataclass(frozen=True, slots=True)
class ExemplarInput:
    text: str
    label: str
    id: str = ""
    """Caller-chosen id; empty: derived from the classifier and the text."""
    metadata: dict[str, str] = field(default_factory=dict)
    vectors: Sequence[tuple[int, Sequence[float]]] = ()
    """Given (dimension, values) pairs, to store without embedding (see :mod:`transfer`)."""
    out_of_scope: bool = False
    """A negative exemplar: an example of what to answer unknown to; ``label`` (optional) names
    its topic."""


@dataclass(frozen=True, slots=True)
class Exemplar:
    id: str
    text: str
    label: str
    metadata: dict[str, str]
    created_at: float
    vectors: Mapping[int, Sequence[float]] = field(default_factory=dict)
    """Its stored vectors by dimension, when asked for."""
    out_of_scope: bool = False
    """A negative exemplar (see :class:`ExemplarInput`)."""

    @classmethod
    def stored(cls, record: Record) -> Exemplar:
        """The exemplar a stored point holds."""
        payload = record.payload
        return cls(
            id=payload["id"],
            text=payload["text"],
            label=payload["label"],
            metadata=payload["metadata"],
            created_at=payload["created_at"],
            out_of_scope=payload["out_of_scope"],
        )


@dataclass(frozen=True, slots=True)
class ClassifyOptions:
    """Per-request overrides; None takes the classifier's default."""

    k: int | None = None
    dimension: int | None = None
    voting: Voting | None = None
    min_similarity: float | None = None
    min_confidence: float | None = None
    temperature: float | None = None


@dataclass(frozen=True, slots=True)
class EvaluateRequest:
    """A sweep: every combination of the lists; an empty list takes the classifier's default."""

    held_out: list[tuple[str, str | None]] = field(default_factory=list)
    """(text, label) pairs, label None for a text that belongs to no label (out of scope);
    empty: leave-one-out over the stored exemplars."""
    k: list[int] = field(default_factory=list)
    voting: list[Voting] = field(default_factory=list)
    dimension: list[int] = field(default_factory=list)
    temperature: list[float] = field(default_factory=list)
    apply_best: bool = False
    target_precision: float | None = None
    target_coverage: float | None = None
    """With apply_best, the share of in-scope texts the out-of-scope threshold keeps; None:
    :data:`out_of_scope.DEFAULT_TARGET_COVERAGE`."""
    leave_out_twins: bool = True
    """Leave-one-out: measure, choose and fit on the answers with each exemplar's twins left
    out with it (:mod:`evaluate.twins`); False: on the plain leave-one-out."""


@dataclass(frozen=True, slots=True)
class ClassifierUpdate:
    """An UpdateClassifier request: the new values of the fields named in ``paths``; the other
    values are ignored."""

    name: str
    paths: tuple[str, ...]
    k: int = 0
    voting: Voting | None = None
    temperature: float = 0.0
    min_similarity: float = 0.0
    min_confidence: float = 0.0
    dimension: int = 0


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """What GetServiceInfo tells a caller about this server."""

    server_version: str
    dimensions: list[int]
    model: str
    width: int
    limits: LimitSettings
