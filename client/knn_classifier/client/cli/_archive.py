"""The export file of a whole classifier: a header line, then one exemplar per line (JSONL).

Header: ``{"format": "knn-classifier-export", "version": 1, "exported_at": ...,
"classifier": {name, instruction, k, voting, min_similarity, min_confidence, temperature,
dimension, calibrated, exemplar_count, created_at}}``; exemplars: ``{"id", "text", "label",
"metadata"}``.
Importing re-embeds the texts, so an export moves between embedders; it carries no vectors.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import IO, Any

from knn_classifier.v1 import classifier_pb2 as pb

from .._client import Client
from .._requests import voting_name
from ._errors import CliError
from ._rows import EXPORT_FORMAT

VERSION = 1


def float32(value: float) -> float:
    """The shortest decimal that reads back as the same float32 (0.05, not 0.0500000007)."""
    packed = struct.pack("<f", value)
    for digits in range(1, 10):
        short = float(f"{value:.{digits}g}")
        if struct.pack("<f", short) == packed:
            return short
    return value


def describe(classifier: pb.Classifier) -> dict[str, Any]:
    """A classifier's settings and counts as plain JSON values (export header, ``show``)."""
    return {
        "name": classifier.name,
        "instruction": classifier.instruction,
        "k": classifier.k,
        "voting": voting_name(classifier.voting),
        "min_similarity": float32(classifier.min_similarity),
        "min_confidence": float32(classifier.min_confidence),
        "temperature": float32(classifier.temperature),
        "dimension": classifier.dimension,
        "calibrated": classifier.calibrated,
        "exemplar_count": classifier.exemplar_count,
        "created_at": classifier.created_at.ToDatetime(UTC).isoformat(timespec="seconds"),
    }


def header(classifier: pb.Classifier) -> dict[str, Any]:
    return {
        "format": EXPORT_FORMAT,
        "version": VERSION,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classifier": describe(classifier),
    }


def exemplar_line(exemplar: pb.Exemplar) -> str:
    record = {
        "id": exemplar.id,
        "text": exemplar.text,
        "label": exemplar.label,
        "metadata": dict(exemplar.metadata),
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def pages(client: Client, classifier: str, page_size: int) -> Iterator[list[pb.Exemplar]]:
    """Every exemplar of the classifier, one ListExemplars page at a time."""
    token = ""
    while True:
        page = client.list_exemplars(classifier, page_size=page_size, page_token=token)
        yield list(page.exemplars)
        token = page.next_page_token
        if not token:
            return


def export(
    client: Client, classifier: pb.Classifier, out: IO[str], page_size: int
) -> Iterator[int]:
    """Writes the export of ``classifier`` to ``out``; yields how many exemplars each page had.

    Pages are read while the classifier may change: export one that is not being written.
    """
    out.write(json.dumps(header(classifier), ensure_ascii=False) + "\n")
    for page in pages(client, classifier.name, page_size):
        out.writelines(exemplar_line(exemplar) for exemplar in page)
        yield len(page)


def create_settings(head: dict[str, Any]) -> dict[str, Any]:
    """The create_classifier keyword arguments that restore the header's settings.

    ``dimension`` and the calibration cannot be set through the API: Evaluate with apply_best
    fits them again (see ``restore_notes``).
    """
    version = head.get("version")
    if version != VERSION:
        raise CliError(f"export format version {version!r}; this client reads version {VERSION}")
    settings = head.get("classifier")
    if not isinstance(settings, dict):
        raise CliError("the export header has no 'classifier' object")
    voting = settings.get("voting")
    return {
        "instruction": settings.get("instruction", ""),
        "k": settings.get("k"),
        "voting": None if voting in (None, "unspecified") else voting,
        "min_similarity": settings.get("min_similarity"),
        "min_confidence": settings.get("min_confidence"),
        "temperature": settings.get("temperature"),
    }


def restore_notes(head: dict[str, Any], name: str) -> list[str]:
    """What the import could not restore, and how to get it back."""
    settings = head.get("classifier") or {}
    lost = []
    if settings.get("calibrated"):
        lost.append("its confidence calibration")
    if settings.get("dimension"):
        lost.append(f"its default dimension {settings['dimension']}")
    if not lost:
        return []
    return [
        f"the exported classifier had {' and '.join(lost)}, which the API cannot set; "
        f"run `knn-classifier evaluate {name} --apply-best` (with the sweep that tuned it) to "
        "fit them again; until then confidence, and min_confidence with it, is the raw share "
        "of the vote"
    ]
