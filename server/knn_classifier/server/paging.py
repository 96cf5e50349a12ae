"""Responses that fit: pages of lists (AIP-158), opaque page tokens, and the byte budget.

A page token is URL-safe base64 of a small JSON object: where the next page starts, and a hash
of the request's filter (the method, classifier, label and scope). A token used with another
filter is refused with INVALID_ARGUMENT instead of silently listing from the wrong place. Tokens are
opaque to callers and not secret: decoding one only reveals a position in a list the caller may
read anyway.

A page holds at most the page size asked for, and fewer when the next item would take the
response over the byte budget; one item that cannot fit alone is an error that says why, and so
is a classify response that cannot fit (it has no pages).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from .errors import InvalidArgument, Reason, ResourceExhausted
from .settings import LimitSettings

DEFAULT_PAGE_SIZE = 100
ENVELOPE_BYTES = 1024
"""Reserved in every page for the next page token and the response's other fields."""

T = TypeVar("T")


def page_size(requested: int, limits: LimitSettings) -> int:
    """0 means the default; above the limit means the limit (AIP-158); negative is an error."""
    if requested < 0:
        raise InvalidArgument(
            f"page_size={requested} is negative; use 0 for the default or a positive number",
            reason=Reason.VALUE_OUT_OF_RANGE,
            metadata={"minimum": 0, "maximum": limits.max_page_size},
            field="page_size",
        )
    return min(requested or DEFAULT_PAGE_SIZE, limits.max_page_size)


def _scope_hash(scope: Sequence[str]) -> str:
    return hashlib.sha256("\x00".join(scope).encode()).hexdigest()[:16]


def encode(cursor: str, scope: Sequence[str]) -> str:
    """A token for the page starting at ``cursor`` of the list that ``scope`` identifies."""
    payload = json.dumps({"c": cursor, "s": _scope_hash(scope)}, separators=(",", ":"))
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode(token: str, scope: Sequence[str]) -> str | None:
    """The cursor of ``token`` (None for the first page), if it was issued for ``scope``."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        payload = json.loads(raw)
        cursor, issued_for = payload["c"], payload["s"]
    except (binascii.Error, ValueError, TypeError, KeyError):
        raise bad_token() from None
    if not isinstance(cursor, str) or issued_for != _scope_hash(scope):
        raise bad_token(
            "page_token was issued for another request (another classifier, label or scope); "
            "use it only with the request that returned it, or start again without a token"
        )
    return cursor


def bad_token(
    message: str = "page_token is not one this server issued; pass next_page_token unchanged",
) -> InvalidArgument:
    return InvalidArgument(message, reason=Reason.INVALID_PAGE_TOKEN, field="page_token")


def point_offset(cursor: str | None) -> str | None:
    """The store offset (a point id) at which a ListExemplars page starts."""
    if cursor is None:
        return None
    try:
        return str(uuid.UUID(cursor))
    except ValueError:
        raise bad_token() from None


def label_cursor(count: int, label: str) -> str:
    """The cursor of the ListLabels page after the label ``label`` with ``count`` exemplars."""
    return f"{count}:{label}"


def label_position(cursor: str | None) -> tuple[int, str] | None:
    """The sort key (-count, label) after which a ListLabels page starts (see
    :func:`label_cursor`)."""
    if cursor is None:
        return None
    count, _, label = cursor.partition(":")
    try:
        return -int(count), label
    except ValueError:
        raise bad_token() from None


def fitting(items: Sequence[T], size: Callable[[T], int], budget: int, what: str) -> int:
    """How many leading ``items`` fit in ``budget`` bytes less the envelope; at least one.

    ``what`` names an item for the error when the first one cannot fit alone.
    """
    room = budget - ENVELOPE_BYTES
    used = 0
    for count, item in enumerate(items):
        used += size(item)
        if used > room:
            if count == 0:
                estimated = used + ENVELOPE_BYTES
                raise ResourceExhausted(
                    f"{what} takes about {estimated} bytes, more than the response budget of "
                    f"{budget} bytes (KNN_LIMITS__MAX_RESPONSE_BYTES on the server)",
                    reason=Reason.RESPONSE_TOO_LARGE,
                    metadata={"limitBytes": budget, "estimatedBytes": estimated},
                )
            return count
    return len(items)


def ensure_fits(sizes: Iterable[int], budget: int, advice: str) -> None:
    """Refuses a response whose parts (``sizes``, consumed only until the budget is passed)
    would not fit in ``budget`` bytes less the envelope; ``advice`` says what to ask instead."""
    room = budget - ENVELOPE_BYTES
    used = 0
    for size in sizes:
        used += size
        if used > room:
            estimated = used + ENVELOPE_BYTES
            raise ResourceExhausted(
                f"the response would take more than {estimated} bytes, over the response budget"
                f" of {budget} bytes (KNN_LIMITS__MAX_RESPONSE_BYTES on the server); {advice}",
                reason=Reason.RESPONSE_TOO_LARGE,
                metadata={"limitBytes": budget, "estimatedBytes": estimated},
            )
