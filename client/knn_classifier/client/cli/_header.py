"""An export header's fields checked for their JSON types before an import acts on them.

The header is a line of a file anyone can edit: a field of the wrong type (``"k": "5"``, a list
for the calibration) must stop the import with a line naming it, not a traceback from deep in
the request's construction. Values are left for the server to check (k in range, a calibration
ascending, ...); only what the client itself reads is checked here.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from .._requests import VOTING_NAMES
from ._errors import CliError

_INT32 = range(-(2**31), 2**31)
_DOUBLE_MAX = sys.float_info.max
_SETTINGS = {
    "instruction": "a string",
    "k": "an integer",
    "voting": f"one of {', '.join(VOTING_NAMES)}",
    "min_similarity": "a number",
    "min_confidence": "a number",
    "temperature": "a number",
    "dimension": "an integer",
}


def _fits(value: Any, kind: str) -> bool:
    if kind == "a string":
        return isinstance(value, str)
    if isinstance(value, bool):
        return False
    if kind == "an integer":
        return isinstance(value, int) and value in _INT32
    if kind == "a number":  # a JSON integer may be past a double's range (OverflowError)
        return isinstance(value, float) or (isinstance(value, int) and abs(value) <= _DOUBLE_MAX)
    if kind == "a list of integers":
        return isinstance(value, list) and all(_fits(item, "an integer") for item in value)
    if kind == "a list of numbers":
        return isinstance(value, list) and all(_fits(item, "a number") for item in value)
    if kind == "an object":
        return isinstance(value, dict)
    return value in VOTING_NAMES or value == "unspecified"  # the voting method


def _check(fields: dict[str, Any], where: str, expected: dict[str, str]) -> None:
    for key, kind in expected.items():
        value = fields.get(key)
        if value is not None and not _fits(value, kind):
            raise CliError(
                f"the export header's {where}{key} is {json.dumps(value)[:80]}, not {kind}: "
                "export the classifier again, or correct the file's first line"
            )


def check(head: dict[str, Any]) -> None:
    """Raises a CliError naming the first field of ``head`` whose type the import cannot use
    (absent and null fields are left to the import's defaults)."""
    top = {"classifier": "an object", "embedder": "an object"}
    _check(head, "", {**top, "vector_dimensions": "a list of integers"})
    _check(head.get("embedder") or {}, "embedder.", {"fingerprint": "a string"})
    settings = head.get("classifier") or {}
    _check(settings, "classifier.", _SETTINGS)
    _check(settings, "classifier.", {"calibration": "an object", "out_of_scope_rule": "an object"})
    _check(
        settings.get("calibration") or {},
        "classifier.calibration.",
        {
            "dimension": "an integer",
            "shares": "a list of numbers",
            "probabilities": "a list of numbers",
            "label_temperature": "a number",
        },
    )
    _check(
        settings.get("out_of_scope_rule") or {},
        "classifier.out_of_scope_rule.",
        {"dimension": "an integer"},
    )
