"""Upper bounds on the encoded size of response messages, computed from domain objects.

List and batch responses must stay under the response budget (``KNN_LIMITS__MAX_RESPONSE_BYTES``)
before any protobuf message is built: a ClassifyBatch with neighbours over long exemplars once
built a 364 MB response before gRPC's send limit refused it. Each function bounds the size of the
message that :mod:`messages` builds from the same object (a test checks the bound and its slack), by
protobuf's encoding: a field costs its tag (1 byte for the field numbers used here), a length
prefix (a varint of at most 5 bytes) and its bytes; a scalar at most 11 bytes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from .domain import ClassifierInfo, Exemplar
from .voting import Vote

if TYPE_CHECKING:  # hygiene and Evaluate size their responses with this module
    from .evaluate.metrics import LabelMetrics, Report
    from .hygiene import Duplicate, ExemplarRef, Mislabelled, Overlap
    from .out_of_scope import OutOfScopeFit

_FIELD = 6
"""Tag and length prefix of a string or message field, at most."""
_SCALAR = 11
"""Tag and value of a varint, float or fixed field, at most."""
_TIMESTAMP = _FIELD + 2 * _SCALAR
_ETAG = _FIELD + 64
"""An etag (a revision) of up to 64 characters."""


def utf8(text: str) -> int:
    """Encoded length of ``text``; free for ASCII (CPython knows a string is ASCII)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def string(text: str) -> int:
    return _FIELD + utf8(text)


def _strings(texts: Iterable[str]) -> int:
    return sum(string(t) for t in texts)


def exemplar(item: Exemplar) -> int:
    """An ``Exemplar`` as one element of a repeated field."""
    entries = sum(_FIELD + string(k) + string(v) for k, v in item.metadata.items())
    # _TIMESTAMP's slack (at most 15 bytes are used) covers out_of_scope's 2.
    return _FIELD + _strings((item.id, item.text, item.label)) + entries + _TIMESTAMP


def classifier(info: ClassifierInfo) -> int:
    """A ``Classifier`` as one element of a repeated field."""
    config = info.config
    threshold = out_of_scope_threshold(config.out_of_scope)
    size = (
        _FIELD + _strings((config.name, config.instruction)) + 8 * _SCALAR + _TIMESTAMP + _ETAG
    ) + threshold
    if config.calibration is not None:  # two packed repeated doubles
        size += _FIELD + 2 * (_FIELD + 8 * len(config.calibration.shares))
    return size


def out_of_scope_threshold(rule: OutOfScopeFit | None) -> int:
    """An ``OutOfScopeThreshold`` as a field of another message (its scalars when ``None``)."""
    size = _FIELD + 5 * _SCALAR
    if rule is not None:  # and its references: three packed repeated doubles
        references = len(rule.similarity) + len(rule.mahalanobis) + len(rule.agreement)
        size += 3 * _FIELD + 8 * references
    return size


def vectors(dimensions: Iterable[int]) -> int:
    """The ``ExemplarVector``s of one exemplar at ``dimensions``: packed floats."""
    return sum(_FIELD + _SCALAR + _FIELD + 4 * dimension for dimension in dimensions)


def label_count(label: str) -> int:
    return _FIELD + string(label) + _SCALAR


def prediction(vote: Vote, include_neighbours: bool, stop_above: int | None = None) -> int:
    """A ``Prediction`` wrapped in a ``ClassifyBatchResult``, as one element of a repeated field.

    Stops adding neighbours once the size passes ``stop_above``, so that a response far over the
    budget is not measured to the end.
    """
    size = 2 * _FIELD + string(vote.label or "") + 4 * _SCALAR
    size += _FIELD + 3 * _SCALAR + _strings(vote.candidates)  # out_of_scope, candidates
    size += sum(_FIELD + string(label) + _SCALAR for label, _ in vote.scores)
    if include_neighbours:
        for neighbour in vote.voters:
            size += _FIELD + _strings((neighbour.id, neighbour.label, neighbour.text)) + _SCALAR
            if stop_above is not None and size > stop_above:
                break
    return size


def status(encoded: int) -> int:
    """A ``google.rpc.Status`` of ``encoded`` bytes wrapped in a ``ClassifyBatchResult``, as one
    element of a repeated field."""
    return 2 * _FIELD + encoded


def _checked(item: ExemplarRef) -> int:
    """A ``CheckedExemplar`` as a field of another message."""
    return _FIELD + _strings((item.id, item.text, item.label))


def checked_exemplar(item: ExemplarRef) -> int:
    """A ``CheckedExemplar`` as one element of a repeated field."""
    return _checked(item)


def mislabelled(item: Mislabelled) -> int:
    """A ``LikelyMislabelled`` as one element of a repeated field."""
    return _FIELD + _checked(item.exemplar) + string(item.voted_label) + _SCALAR


def duplicate(item: Duplicate) -> int:
    """A ``CrossLabelDuplicate`` as one element of a repeated field."""
    return _FIELD + _checked(item.first) + _checked(item.second) + _SCALAR


def overlap(item: Overlap) -> int:
    """A ``LabelOverlap`` as one element of a repeated field."""
    return _FIELD + _strings((item.first_label, item.second_label)) + 5 * _SCALAR


_RESULT_SCALARS = 16
"""Scalar fields of an ``EvaluationResult`` (and its ``OutOfScopeMetrics``), with room for more."""


def evaluation_result(report: Report) -> int:
    """An ``EvaluationResult`` without its ``labels``, as one element of a repeated field."""
    confusions = sum(_FIELD + _strings((t, p)) + _SCALAR for t, p, _ in report.confusions)
    size = _FIELD + _RESULT_SCALARS * _SCALAR + confusions
    if report.out_of_scope is not None:
        size += _FIELD + _RESULT_SCALARS * _SCALAR
        size += out_of_scope_threshold(report.out_of_scope.threshold)
    return size


def label_metrics(metrics: Iterable[LabelMetrics]) -> int:
    """An ``EvaluationResult``'s ``labels``: one ``LabelMetrics`` each (a label, three floats of
    5 bytes with their tags, and a count). A label (1 KiB at most) and a LabelMetrics are under
    16 KiB: their length prefixes take 2 bytes, the tag 1. There can be hundreds of thousands."""
    return sum(3 + 3 + utf8(m.label) + 3 * 5 + _SCALAR for m in metrics)
