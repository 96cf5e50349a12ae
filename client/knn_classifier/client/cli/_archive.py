"""The export file of a whole classifier: a header line, then one exemplar per line (JSONL).

Header: ``{"format": "knn-classifier-export", "version": 2, "exported_at": ...,
"classifier": {name, instruction, k, voting, min_similarity, min_confidence, temperature,
dimension, calibrated, exemplar_count, created_at, calibration, out_of_scope_rule}, "embedder":
{model, width, fingerprint}, "dimensions": [...], "vector_dimensions": [...]}``; ``calibration``
is null or ``{dimension, shares, probabilities, label_temperature}``, the dimension it was
fitted at and the label models' temperature it was fitted with (absent before 2026-11-30: the
default);
``out_of_scope_rule`` null or the fitted out-of-scope threshold whole, ``{threshold,
target_coverage, coverage, dimension, similarity_references, mahalanobis_references,
agreement_references, reference_size}``
(``Classifier.out_of_scope_threshold``). Exemplars: ``{"id",
"text", "label", "metadata"}``, and with ``--vectors`` ``"vectors": {dimension: base64 of
little-endian float32}`` for every dimension the server keeps.

An import into a server whose embedder has the same fingerprint restores the calibration and
the out-of-scope rule and stores the vectors as they are (no embedding call); into another
embedder it embeds the texts and leaves both for Evaluate to fit there (:func:`plan_restore`).
Version 1 files (no calibration, no vectors) and version 2 files without ``out_of_scope_rule``
still import, and so do rules exported under the fields' former singular names
(``similarity_reference`` ...: :data:`FORMER_RULE_KEYS`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import IO, Any

from google.protobuf.json_format import MessageToDict, ParseDict, ParseError

from knn_classifier.v1 import classifier_pb2 as pb

from .._client import Client
from .._requests import voting_name
from . import _header
from ._errors import CliError
from ._rows import EXPORT_FORMAT, encode_vector

VERSION = 2
READABLE_VERSIONS = (1, 2)
FORMER_RULE_KEYS = {
    "similarity_reference": "similarity_references",
    "mahalanobis_reference": "mahalanobis_references",
    "agreement_reference": "agreement_references",
}
"""The out-of-scope rule's keys in files exported before the fields took plural names."""


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
        "out_of_scope_threshold": classifier.HasField("out_of_scope_threshold"),
        "exemplar_count": classifier.exemplar_count,
        "created_at": classifier.created_at.ToDatetime(UTC).isoformat(timespec="seconds"),
    }


def header(
    classifier: pb.Classifier, info: pb.ServiceInfo, vector_dimensions: list[int]
) -> dict[str, Any]:
    calibration = None
    if classifier.calibrated:
        calibration = {
            # 0 means the largest dimension of the server it was fitted on: say which.
            "dimension": classifier.dimension or max(info.dimensions),
            "shares": list(classifier.calibration.shares),
            "probabilities": list(classifier.calibration.probabilities),
            "label_temperature": classifier.calibration.label_temperature,
        }
    rule = None
    if classifier.HasField("out_of_scope_threshold"):
        rule = MessageToDict(
            classifier.out_of_scope_threshold,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    embedder = info.embedder
    return {
        "format": EXPORT_FORMAT,
        "version": VERSION,
        "exported_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "classifier": {
            **describe(classifier),
            "calibration": calibration,
            "out_of_scope_rule": rule,
        },
        "embedder": {
            "model": embedder.model,
            "width": embedder.width,
            "fingerprint": embedder.fingerprint,
        },
        "dimensions": list(info.dimensions),
        "vector_dimensions": vector_dimensions,
    }


def exemplar_line(exemplar: pb.Exemplar) -> str:
    record: dict[str, Any] = {
        "id": exemplar.id,
        "text": exemplar.text,
        "label": exemplar.label,
        "metadata": dict(exemplar.metadata),
    }
    if exemplar.out_of_scope:
        record["out_of_scope"] = True
    if exemplar.vectors:
        record["vectors"] = {str(v.dimension): encode_vector(v.values) for v in exemplar.vectors}
    return json.dumps(record, ensure_ascii=False) + "\n"


def pages(
    client: Client, classifier: str, page_size: int, with_vectors: bool = False
) -> Iterator[list[pb.Exemplar]]:
    """Every exemplar of the classifier, one ListExemplars page at a time."""
    token = ""
    while True:
        page = client.list_exemplars(
            classifier, page_size=page_size, page_token=token, with_vectors=with_vectors
        )
        yield list(page.exemplars)
        token = page.next_page_token
        if not token:
            return


def export(
    client: Client, classifier: pb.Classifier, out: IO[str], page_size: int, with_vectors: bool
) -> Iterator[int]:
    """Writes the export of ``classifier`` to ``out``; yields how many exemplars each page had.

    Pages are read while the classifier may change: export one that is not being written.
    """
    info = client.get_service_info()
    vector_dimensions = list(info.dimensions) if with_vectors else []
    out.write(json.dumps(header(classifier, info, vector_dimensions), ensure_ascii=False) + "\n")
    for page in pages(client, classifier.name, page_size, with_vectors):
        out.writelines(exemplar_line(exemplar) for exemplar in page)
        yield len(page)


@dataclass(frozen=True)
class Restore:
    """How an export goes into this server: CreateClassifier's arguments, whether the
    exemplars carry their vectors (and the fingerprint to send with them), and notes on what
    could not be carried over."""

    settings: dict[str, Any]
    vectors_fingerprint: str
    notes: list[str]


def plan_restore(head: dict[str, Any], name: str, info: pb.ServiceInfo) -> Restore:
    """What of the export ``head`` describes can be restored on the server of ``info``.

    The calibration, the out-of-scope rule and the vectors hold only for the embedder that
    made them: they are carried only if its fingerprint is this server's, the calibration and
    the rule only if this server keeps the dimension they were fitted at, the vectors only if
    they are as wide as every dimension this server keeps (the server truncates them to
    narrower ones). Else the texts are embedded here and the calibration and the rule are left
    for Evaluate to fit again.
    """
    version = head.get("version")
    if version not in READABLE_VERSIONS:
        raise CliError(
            f"export format version {version!r}; this client reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    _header.check(head)
    settings = head.get("classifier")
    if not isinstance(settings, dict):
        raise CliError("the export header has no 'classifier' object")
    voting = settings.get("voting")
    create: dict[str, Any] = {
        "instruction": settings.get("instruction", ""),
        "k": settings.get("k"),
        "voting": None if voting in (None, "unspecified") else voting,
        "min_similarity": settings.get("min_similarity"),
        "min_confidence": settings.get("min_confidence"),
        "temperature": settings.get("temperature"),
    }
    kept = list(info.dimensions)
    fingerprint = info.embedder.fingerprint
    same = bool(fingerprint) and (head.get("embedder") or {}).get("fingerprint") == fingerprint
    notes = []
    dimension = settings.get("dimension") or 0
    if dimension in kept:
        create["dimension"] = dimension
    elif dimension:
        notes.append(
            f"its default dimension {dimension} is not kept here: it classifies at the largest"
        )
    calibration = settings.get("calibration")
    if calibration and same and calibration.get("dimension") in kept:
        create["dimension"] = calibration["dimension"]
        create["calibration"] = pb.Calibration(
            shares=calibration.get("shares") or [],
            probabilities=calibration.get("probabilities") or [],
            label_temperature=calibration.get("label_temperature") or 0,
        )
        create["embedder_fingerprint"] = fingerprint
    elif settings.get("calibrated"):
        if not calibration:
            why = "is not in this export (version 1)"
        else:
            why = f"was fitted for another {'dimension' if same else 'embedder'} than this server's"
        notes.append(
            f"its confidence calibration {why}, so it is not restored: run "
            f"`knn-classifier evaluate {name} --apply-best` (with the sweep that tuned it) to fit "
            "it here; until then confidence, and min_confidence with it, is the raw share of "
            "the vote"
        )
    rule = settings.get("out_of_scope_rule")
    if isinstance(rule, dict) and same and rule.get("dimension") in kept:
        create["out_of_scope_threshold"] = _out_of_scope_threshold(rule)
        create["embedder_fingerprint"] = fingerprint
    elif settings.get("out_of_scope_threshold"):
        if not rule:
            why = "is not in this export (made before exports carried it)"
        else:
            why = f"was fitted for another {'dimension' if same else 'embedder'} than this server's"
        notes.append(
            f"its out-of-scope threshold {why}, so it is not restored: run "
            f"`knn-classifier evaluate {name} --apply-best` (with the sweep that tuned it) to fit "
            "it here; until then no text is answered out of scope"
        )
    exported = head.get("vector_dimensions") or []
    usable = same and bool(exported) and max(exported) >= max(kept)
    if exported and not usable:
        notes.append(
            "the export's vectors were made by another embedder or are narrower than this "
            "server's dimensions: the texts are embedded here instead"
        )
    return Restore(create, fingerprint if usable else "", notes)


def _out_of_scope_threshold(rule: Any) -> pb.OutOfScopeThreshold:
    """The header's ``out_of_scope_rule`` as CreateClassifier restores it (the server checks
    its values). Keys of the former singular names are read when the plural ones are absent."""
    current = dict(rule)
    for former, key in FORMER_RULE_KEYS.items():
        if former in current:
            current.setdefault(key, current.pop(former))
    try:
        return ParseDict(current, pb.OutOfScopeThreshold())
    except (ParseError, OverflowError) as error:  # Overflow: a JSON integer past a double
        raise CliError(f"the export header's out_of_scope_rule is malformed: {error}") from None
