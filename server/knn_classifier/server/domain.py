"""The service's own data types, free of protobuf and of the store's formats."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .voting import Voting


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

    def to_payload(self) -> dict[str, Any]:
        return {
            "kind": "classifier",
            "name": self.name,
            "instruction": self.instruction,
            "k": self.k,
            "voting": self.voting.value,
            "min_similarity": self.min_similarity,
            "min_confidence": self.min_confidence,
            "created_at": self.created_at,
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


@dataclass(frozen=True, slots=True)
class ExemplarInput:
    text: str
    label: str
    id: str = ""
    """Caller-chosen id; empty: derived from the classifier and the text."""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Exemplar:
    id: str
    text: str
    label: str
    metadata: dict[str, str]
    created_at: float


@dataclass(frozen=True, slots=True)
class ClassifyOptions:
    """Per-request overrides; None takes the classifier's default."""

    k: int | None = None
    dimension: int | None = None
    voting: Voting | None = None
    min_similarity: float | None = None
    min_confidence: float | None = None
