"""Checks on request fields; each failure is an InvalidArgument saying what is wrong.

``what`` names the request field at fault as a path (``exemplars[3].text``); it becomes the
field of the error's BadRequest violation, and the error's reason and metadata say what kind of
limit was passed.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import InvalidArgument, Reason
from .settings import LimitSettings

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The fixed limits, by short names; their home is LimitSettings beside the configurable ones.
MAX_LABEL_CHARS = LimitSettings.max_label_chars
MAX_ID_CHARS = LimitSettings.max_id_chars
MAX_INSTRUCTION_CHARS = LimitSettings.max_instruction_chars
MAX_METADATA_ENTRIES = LimitSettings.max_metadata_entries
MAX_METADATA_CHARS = LimitSettings.max_metadata_chars
MAX_TEMPERATURE = LimitSettings.max_temperature


def classifier_name(name: str, what: str = "classifier") -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid classifier name {name[:80]!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit",
            reason=Reason.INVALID_NAME,
            field=what,
        )
    return name


def text(value: str, limits: LimitSettings, what: str = "text") -> str:
    if not value.strip():
        raise InvalidArgument(f"{what} is empty", reason=Reason.FIELD_REQUIRED, field=what)
    if len(value) > limits.max_text_chars:
        raise InvalidArgument(
            f"{what} has {len(value)} characters; the limit is {limits.max_text_chars}",
            reason=Reason.TEXT_TOO_LONG,
            metadata={"limitChars": limits.max_text_chars, "actualChars": len(value)},
            field=what,
        )
    return value


def batch_size(count: int, limits: LimitSettings, what: str) -> None:
    if count == 0:
        raise InvalidArgument(f"no {what} given", reason=Reason.FIELD_REQUIRED, field=what)
    if count > limits.max_batch_size:
        raise InvalidArgument(
            f"{count} {what} in one request; the limit is {limits.max_batch_size}",
            reason=Reason.TOO_MANY_ITEMS,
            metadata={"limit": limits.max_batch_size, "actual": count},
            field=what,
        )


def neighbours(texts: int, k: int, limits: LimitSettings) -> None:
    """Bounds the work of one classify call: every text gets k neighbours."""
    if texts * k > limits.max_batch_neighbours:
        raise InvalidArgument(
            f"{texts} texts x k={k} asks for {texts * k} neighbours; the limit is "
            f"{limits.max_batch_neighbours} per call: send fewer texts per call or a smaller k",
            reason=Reason.TOO_MANY_NEIGHBOURS,
            metadata={"limit": limits.max_batch_neighbours, "actual": texts * k},
            field="texts",
        )


def label(value: str, what: str = "label") -> str:
    """Labels are exact, case-sensitive names; whitespace around one or a control character in
    one would silently make a second label that prints like the first, so both are refused."""
    if not value.strip():
        raise InvalidArgument(f"{what} is empty", reason=Reason.FIELD_REQUIRED, field=what)
    if value != value.strip() or not value.isprintable():
        raise InvalidArgument(
            f"{what} {value[:80]!r} has whitespace around it or a control character; "
            "send the label exactly as it should be stored",
            field=what,
        )
    if len(value) > MAX_LABEL_CHARS:
        raise _too_long(
            f"{what} is longer than {MAX_LABEL_CHARS} characters", what, MAX_LABEL_CHARS
        )
    return value


def exemplar_id(value: str, what: str) -> str:
    if len(value) > MAX_ID_CHARS:
        raise _too_long(f"{what} is longer than {MAX_ID_CHARS} characters", what, MAX_ID_CHARS)
    return value


def instruction(value: str) -> str:
    if len(value) > MAX_INSTRUCTION_CHARS:
        raise _too_long(
            f"instruction is longer than {MAX_INSTRUCTION_CHARS} characters",
            "instruction",
            MAX_INSTRUCTION_CHARS,
        )
    return value


def metadata(value: dict[str, str], what: str) -> dict[str, str]:
    if len(value) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(
            f"{what} has more than {MAX_METADATA_ENTRIES} entries",
            reason=Reason.VALUE_TOO_LONG,
            metadata={"limitEntries": MAX_METADATA_ENTRIES},
            field=what,
        )
    for key, item in value.items():
        if len(key) > MAX_METADATA_CHARS or len(item) > MAX_METADATA_CHARS:
            raise _too_long(
                f"{what} has a key or value over {MAX_METADATA_CHARS} characters",
                what,
                MAX_METADATA_CHARS,
            )
    return value


def _too_long(message: str, what: str, limit: int) -> InvalidArgument:
    return InvalidArgument(
        message, reason=Reason.VALUE_TOO_LONG, metadata={"limitChars": limit}, field=what
    )


def k(value: int, limits: LimitSettings, what: str = "k") -> int:
    if not 1 <= value <= limits.max_k:
        raise _out_of_range(
            f"k={value} is out of range; use 1 to {limits.max_k}", what, 1, limits.max_k
        )
    return value


def dimension(value: int, configured: Sequence[int], what: str = "dimension") -> int:
    if value not in configured:
        listed = ", ".join(map(str, configured))
        raise InvalidArgument(
            f"dimension {value} is not configured; use one of {listed}",
            reason=Reason.DIMENSION_NOT_CONFIGURED,
            metadata={"configured": ",".join(map(str, configured))},
            field=what,
        )
    return value


def fraction(value: float, name: str, low: float, high: float) -> float:
    if math.isnan(value) or not low <= value <= high:
        raise _out_of_range(
            f"{name}={value} is out of range; use {low:g} to {high:g}", name, low, high
        )
    return value


def temperature(value: float, what: str = "temperature") -> float:
    if math.isnan(value) or not 0.0 < value <= MAX_TEMPERATURE:
        raise _out_of_range(
            f"temperature={value} is out of range; use more than 0, up to {MAX_TEMPERATURE:g}",
            what,
            0.0,
            MAX_TEMPERATURE,
        )
    return value


def _out_of_range(message: str, what: str, low: float, high: float) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason=Reason.VALUE_OUT_OF_RANGE,
        metadata={"minimum": f"{low:g}", "maximum": f"{high:g}"},
        field=what,
    )
