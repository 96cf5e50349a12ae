"""The payload of an exemplar's points: its fields, written and read in one place.

Every dimension holds the same payload for an exemplar's point. ``classifier`` scopes every
operation (a tenant index) and ``label`` is indexed for deletes by label; the text is kept so that
any dimension can be rebuilt by embedding it again. ``out_of_scope`` marks a negative exemplar
(an example of what the classifier should answer "unknown" to); queries filter on it only for
classifiers that hold negatives.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypedDict

CLASSIFIER: Final = "classifier"
"""The field every query filters on (the stores' tenant index)."""
LABEL: Final = "label"
"""The indexed field deletes by label filter on."""
OUT_OF_SCOPE: Final = "out_of_scope"
"""Stored (true) on negative exemplars only: filters test whether it is there, since Qdrant
Edge's Python binding cannot match a boolean value (it passes ``True`` as the integer 1)."""
METADATA: Final = "metadata"
"""The field a snapshot of a classifier (``Store.vectors``) leaves out (:class:`ExemplarFields`)."""


class ExemplarFields(TypedDict):
    """An exemplar's payload without its metadata: what a snapshot of a classifier
    (``Store.vectors``) carries, since its readers (label models, Evaluate) read no metadata."""

    classifier: str
    id: str
    """The exemplar's id in the API (the point id is derived from it, see service.py)."""
    label: str
    text: str
    created_at: float
    """Seconds since the epoch."""
    out_of_scope: bool
    """A negative exemplar: it belongs to no label, and ``label`` (maybe empty) names its topic."""


class ExemplarPayload(ExemplarFields):
    metadata: dict[str, str]


def exemplar_payload(
    classifier: str,
    exemplar_id: str,
    label: str,
    text: str,
    metadata: Mapping[str, str],
    created_at: float,
    out_of_scope: bool = False,
) -> ExemplarPayload:
    return {
        "classifier": classifier,
        "id": exemplar_id,
        "label": label,
        "text": text,
        "metadata": dict(metadata),
        "created_at": created_at,
        "out_of_scope": out_of_scope,
    }


def stored_payload(payload: ExemplarPayload) -> dict[str, Any]:
    """The payload as the stores write it: ``out_of_scope`` only on negative exemplars."""
    stored = dict(payload)
    if not stored.get(OUT_OF_SCOPE):
        stored.pop(OUT_OF_SCOPE, None)
    return stored


def read_payload(stored: Mapping[str, Any] | None) -> ExemplarPayload:
    """The payload a store returned; points written before metadata and creation times were
    kept read as having none."""
    metadata = (stored or {}).get(METADATA) or {}
    return {**read_fields(stored), METADATA: {str(k): str(v) for k, v in metadata.items()}}


def read_fields(stored: Mapping[str, Any] | None) -> ExemplarFields:
    """:func:`read_payload` without the metadata (``stored`` may hold it or not)."""
    stored = stored or {}
    return {
        CLASSIFIER: str(stored.get(CLASSIFIER, "")),
        "id": str(stored.get("id", "")),
        LABEL: str(stored.get(LABEL, "")),
        "text": str(stored.get("text", "")),
        "created_at": float(stored.get("created_at") or 0.0),
        OUT_OF_SCOPE: bool(stored.get(OUT_OF_SCOPE, False)),
    }
