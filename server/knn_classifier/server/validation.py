"""Checks on request fields; each failure is an InvalidArgument saying what is wrong."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .errors import InvalidArgument
from .settings import LimitSettings

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_LABEL_CHARS = 256
MAX_ID_CHARS = 128
MAX_INSTRUCTION_CHARS = 2048
MAX_METADATA_ENTRIES = 32
MAX_METADATA_CHARS = 1024


def classifier_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"invalid classifier name {name[:80]!r}: use 1-64 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return name


def text(value: str, limits: LimitSettings, what: str = "text") -> str:
    if not value.strip():
        raise InvalidArgument(f"{what} is empty")
    if len(value) > limits.max_text_chars:
        raise InvalidArgument(
            f"{what} has {len(value)} characters; the limit is {limits.max_text_chars}"
        )
    return value


def batch_size(count: int, limits: LimitSettings, what: str) -> None:
    if count == 0:
        raise InvalidArgument(f"no {what} given")
    if count > limits.max_batch_size:
        raise InvalidArgument(
            f"{count} {what} in one request; the limit is {limits.max_batch_size}"
        )


def label(value: str, what: str = "label") -> str:
    """Labels are exact, case-sensitive names; whitespace around one or a control character in
    one would silently make a second label that prints like the first, so both are refused."""
    if not value.strip():
        raise InvalidArgument(f"{what} is empty")
    if value != value.strip() or not value.isprintable():
        raise InvalidArgument(
            f"{what} {value[:80]!r} has whitespace around it or a control character; "
            "send the label exactly as it should be stored"
        )
    if len(value) > MAX_LABEL_CHARS:
        raise InvalidArgument(f"{what} is longer than {MAX_LABEL_CHARS} characters")
    return value


def exemplar_id(value: str, what: str) -> str:
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(f"{what} is longer than {MAX_ID_CHARS} characters")
    return value


def instruction(value: str) -> str:
    if len(value) > MAX_INSTRUCTION_CHARS:
        raise InvalidArgument(f"instruction is longer than {MAX_INSTRUCTION_CHARS} characters")
    return value


def metadata(value: dict[str, str], what: str) -> dict[str, str]:
    if len(value) > MAX_METADATA_ENTRIES:
        raise InvalidArgument(f"{what} has more than {MAX_METADATA_ENTRIES} entries")
    for key, item in value.items():
        if len(key) > MAX_METADATA_CHARS or len(item) > MAX_METADATA_CHARS:
            raise InvalidArgument(f"{what} has a key or value over {MAX_METADATA_CHARS} characters")
    return value


def k(value: int, limits: LimitSettings) -> int:
    if not 1 <= value <= limits.max_k:
        raise InvalidArgument(f"k={value} is out of range; use 1 to {limits.max_k}")
    return value


def dimension(value: int, configured: Sequence[int]) -> int:
    if value not in configured:
        raise InvalidArgument(
            f"dimension {value} is not configured; use one of {', '.join(map(str, configured))}"
        )
    return value


def fraction(value: float, name: str, low: float, high: float) -> float:
    if math.isnan(value) or not low <= value <= high:
        raise InvalidArgument(f"{name}={value} is out of range; use {low:g} to {high:g}")
    return value


MAX_TEMPERATURE = 10.0


def temperature(value: float) -> float:
    if math.isnan(value) or not 0.0 < value <= MAX_TEMPERATURE:
        raise InvalidArgument(
            f"temperature={value} is out of range; use more than 0, up to {MAX_TEMPERATURE:g}"
        )
    return value
