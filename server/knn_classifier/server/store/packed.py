"""Exemplar payloads as the in-memory copies hold them: out of the garbage collector's sight.

CPython's cyclic garbage collector visits every object it tracks at each full collection, which
holds the GIL throughout, in whichever thread set it off (the event loop's included). A dict is
tracked as soon as it holds a value that could be part of a cycle, such as another dict: each
payload, whose ``metadata`` is a dict, was tracked, one object per point of every loaded copy,
so the collections grew with the exemplars held (docs/reliability.md). A packed payload holds
its metadata as JSON text (None when empty), so it holds only strings, numbers and None, and
CPython does not track it; the payload is built again, a new dict, when a record is returned,
or only its fields but the metadata for a snapshot's record (:func:`fields`).
"""

from __future__ import annotations

import json
from typing import cast

from .schema import METADATA, ExemplarFields, ExemplarPayload

PackedPayload = dict[str, str | float | bool | None]


def pack(payload: ExemplarPayload) -> PackedPayload:
    # Built item by item: a copy of a tracked dict ({**payload}, dict(payload)) is tracked too.
    packed = {
        key: _metadata_text(payload[METADATA]) if key == METADATA else value
        for key, value in payload.items()
    }
    return cast(PackedPayload, packed)


def unpack(packed: PackedPayload) -> ExemplarPayload:
    """The payload ``packed`` was made from, a new dict (callers may change it)."""
    text = packed[METADATA]
    metadata = json.loads(text) if isinstance(text, str) else {}
    return cast(ExemplarPayload, {**packed, METADATA: metadata})


def fields(packed: PackedPayload) -> ExemplarFields:
    """The fields of the payload ``packed`` was made from but its metadata, a new dict
    (callers may change it) that holds no container, so CPython does not track it either."""
    copied = packed.copy()
    del copied[METADATA]
    return cast(ExemplarFields, copied)


def _metadata_text(metadata: dict[str, str]) -> str | None:
    return json.dumps(metadata, separators=(",", ":")) if metadata else None
