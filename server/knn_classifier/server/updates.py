"""UpdateClassifier's field mask: which fields may change, and their new values checked.

The mask is required: proto3 cannot tell a number left unset from 0. name and instruction never
change (every stored vector was made with the instruction), nor the output-only fields.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from . import validation
from .domain import ClassifierUpdate
from .errors import InvalidArgument, Reason
from .settings import LimitSettings

UPDATABLE_FIELDS = frozenset(
    {"k", "voting", "temperature", "min_similarity", "min_confidence", "dimension"}
)
_NOT_UPDATABLE = {
    "name": "the name cannot change; create another classifier instead",
    "instruction": "the instruction cannot change: every stored vector was made with it; "
    "create another classifier instead",
    "created_at": "created_at is output only",
    "exemplar_count": "exemplar_count is output only",
    "calibrated": "calibrated is output only: Evaluate with apply_best fits the calibration",
    "etag": "etag is not a field to change: set classifier.etag to make the update conditional",
    "calibration": "calibration is output only: Evaluate with apply_best fits it",
    "out_of_scope_threshold": "out_of_scope_threshold is output only: Evaluate with apply_best "
    "fits it (CreateClassifier restores an exported one)",
}


def validated_changes(
    update: ClassifierUpdate, limits: LimitSettings, dimensions: Sequence[int]
) -> dict[str, Any]:
    """The fields to change and their new values, or an InvalidArgument naming the mask path or
    the value at fault."""
    if not update.paths:
        raise InvalidArgument(
            "update_mask is empty; name the fields to change, e.g. paths: ['k']",
            reason=Reason.FIELD_REQUIRED,
            field="update_mask",
        )
    for i, path in enumerate(update.paths):
        if path not in UPDATABLE_FIELDS:
            why = _NOT_UPDATABLE.get(path, f"{path[:80]!r} is not a field of Classifier")
            raise InvalidArgument(
                f"{why}; update_mask may name {', '.join(sorted(UPDATABLE_FIELDS))}",
                reason=Reason.FIELD_NOT_UPDATABLE,
                field=f"update_mask.paths[{i}]",
            )
    changes: dict[str, Any] = {}
    for path in set(update.paths):
        value = getattr(update, path)
        field = f"classifier.{path}"
        if path == "k":
            value = validation.k(value, limits, field)
        elif path == "voting" and value is None:
            raise InvalidArgument(
                f"{field} must name a voting method", reason=Reason.FIELD_REQUIRED, field=field
            )
        elif path == "temperature":
            value = validation.temperature(value, field)
        elif path == "min_similarity":
            value = validation.fraction(value, field, -1, 1)
        elif path == "min_confidence":
            value = validation.fraction(value, field, 0, 1)
        elif path == "dimension" and value != 0:
            value = validation.dimension(value, dimensions, field)
        changes[path] = value
    return changes
