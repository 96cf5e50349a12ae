"""The payload of an exemplar's points: its fields, written and read in one place.

Every dimension holds the same payload for an exemplar's point. ``classifier`` scopes every
operation (a tenant index) and ``label`` is indexed for deletes by label; the text is kept so that
any dimension can be rebuilt by embedding it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, TypedDict

CLASSIFIER: Final = "classifier"
"""The field every query filters on (the stores' tenant index)."""
LABEL: Final = "label"
"""The indexed field deletes by label filter on."""


class ExemplarPayload(TypedDict):
    classifier: str
    id: str
    """The exemplar's id in the API (the point id is derived from it, see service.py)."""
    label: str
    text: str
    metadata: dict[str, str]
    created_at: float
    """Seconds since the epoch."""


def exemplar_payload(
    classifier: str,
    exemplar_id: str,
    label: str,
    text: str,
    metadata: Mapping[str, str],
    created_at: float,
) -> ExemplarPayload:
    return {
        "classifier": classifier,
        "id": exemplar_id,
        "label": label,
        "text": text,
        "metadata": dict(metadata),
        "created_at": created_at,
    }


def read_payload(stored: Mapping[str, Any] | None) -> ExemplarPayload:
    """The payload a store returned; points written before metadata and creation times were
    kept read as having none."""
    stored = stored or {}
    return exemplar_payload(
        str(stored.get(CLASSIFIER, "")),
        str(stored.get("id", "")),
        str(stored.get(LABEL, "")),
        str(stored.get("text", "")),
        {str(k): str(v) for k, v in (stored.get("metadata") or {}).items()},
        float(stored.get("created_at") or 0.0),
    )
