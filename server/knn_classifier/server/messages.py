"""Conversions between the protobuf messages of classifiers, exemplars, Classify and
GetServiceInfo and the domain types: pure functions, proto -> domain (parsing, which refuses bad
values with :class:`errors.InvalidArgument`) and domain -> proto.

Evaluate and CheckExemplars have theirs in :mod:`evaluation_messages`.
"""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from knn_classifier.v1 import classifier_pb2 as pb

from . import errors
from .calibration import Calibration
from .domain import (
    ClassifierInfo,
    ClassifierUpdate,
    ClassifyOptions,
    Exemplar,
    ExemplarInput,
    NewClassifier,
    ServiceInfo,
)
from .out_of_scope import OutOfScopeFit
from .voting import UnknownReason, Vote, Voting

API_VERSION = "v1"

# Each method of voting.Voting is the proto's VOTING_<NAME>: a method the proto lacks fails here,
# at import; one voting.py lacks is refused as an unknown value (tests/test_voting_names.py).
_VOTING_FROM_PB = {pb.Voting.Value(f"VOTING_{method.name}"): method for method in Voting}
VOTING_TO_PB = {value: key for key, value in _VOTING_FROM_PB.items()}
_REASON_TO_PB = {
    UnknownReason.BELOW_MIN_SIMILARITY: pb.UNKNOWN_REASON_BELOW_MIN_SIMILARITY,
    UnknownReason.BELOW_MIN_CONFIDENCE: pb.UNKNOWN_REASON_BELOW_MIN_CONFIDENCE,
    UnknownReason.OUT_OF_SCOPE: pb.UNKNOWN_REASON_OUT_OF_SCOPE,
    UnknownReason.AMBIGUOUS: pb.UNKNOWN_REASON_AMBIGUOUS,
}


def new_classifier(request: pb.CreateClassifierRequest) -> NewClassifier:
    return NewClassifier(
        name=request.name,
        instruction=request.instruction,
        k=request.k if request.HasField("k") else None,
        voting=voting(request.voting),
        min_similarity=request.min_similarity if request.HasField("min_similarity") else None,
        min_confidence=request.min_confidence if request.HasField("min_confidence") else None,
        temperature=request.temperature if request.HasField("temperature") else None,
        dimension=request.dimension if request.HasField("dimension") else None,
        calibration=(
            Calibration(tuple(request.calibration.shares), tuple(request.calibration.probabilities))
            if request.HasField("calibration")
            else None
        ),
        embedder_fingerprint=request.embedder_fingerprint,
        label_temperature=request.calibration.label_temperature or None,
        out_of_scope=(
            _out_of_scope_fit(request.out_of_scope_threshold)
            if request.HasField("out_of_scope_threshold")
            else None
        ),
    )


def _out_of_scope_fit(given: pb.OutOfScopeThreshold) -> OutOfScopeFit:
    """An exported rule as given, unchecked (:func:`transfer.restored_out_of_scope` checks it)."""
    return OutOfScopeFit(
        dimension=given.dimension,
        target_coverage=given.target_coverage,
        threshold=given.threshold,
        coverage=given.coverage,
        similarity=tuple(given.similarity_references),
        mahalanobis=tuple(given.mahalanobis_references),
        agreement=tuple(given.agreement_references),
        reference_size=given.reference_size,
    )


def classifier_update(request: pb.UpdateClassifierRequest) -> ClassifierUpdate:
    given = request.classifier
    paths = tuple(request.update_mask.paths)
    return ClassifierUpdate(
        name=given.name,
        paths=paths,
        k=given.k,
        voting=voting(given.voting) if "voting" in paths else None,
        temperature=given.temperature,
        min_similarity=given.min_similarity,
        min_confidence=given.min_confidence,
        dimension=given.dimension,
    )


def exemplar_inputs(request: pb.AddExemplarsRequest) -> list[ExemplarInput]:
    return [
        ExemplarInput(
            text=e.text,
            label=e.label,
            id=e.id,
            metadata=dict(e.metadata),
            vectors=[(v.dimension, v.values) for v in e.vectors],
            out_of_scope=e.out_of_scope,
        )
        for e in request.exemplars
    ]


def service_info(info: ServiceInfo, fingerprint: str) -> pb.ServiceInfo:
    limits = info.limits
    return pb.ServiceInfo(
        api_version=API_VERSION,
        server_version=info.server_version,
        dimensions=info.dimensions,
        embedder=pb.Embedder(model=info.model, width=info.width, fingerprint=fingerprint),
        limits=pb.Limits(
            max_text_chars=limits.max_text_chars,
            max_batch_size=limits.max_batch_size,
            max_k=limits.max_k,
            max_batch_neighbours=limits.max_batch_neighbours,
            max_page_size=limits.max_page_size,
            max_sweep=limits.max_sweep,
            max_evaluated=limits.max_evaluated,
            max_exemplars_per_classifier=limits.max_exemplars_per_classifier,
            max_request_bytes=limits.max_request_bytes,
            max_response_bytes=limits.max_response_bytes,
        ),
    )


def out_of_scope_threshold(rule: OutOfScopeFit | None) -> pb.OutOfScopeThreshold | None:
    if rule is None:
        return None
    return pb.OutOfScopeThreshold(
        threshold=rule.threshold,
        target_coverage=rule.target_coverage,
        coverage=rule.coverage,
        dimension=rule.dimension,
        similarity_references=rule.similarity,
        mahalanobis_references=rule.mahalanobis,
        agreement_references=rule.agreement,
        reference_size=rule.reference_size,
    )


def voting(value: pb.Voting.ValueType) -> Voting | None:
    if value == pb.VOTING_UNSPECIFIED:
        return None
    try:
        return _VOTING_FROM_PB[value]
    except KeyError:
        raise errors.InvalidArgument(
            f"unknown voting method {value}", reason=errors.Reason.VALUE_OUT_OF_RANGE
        ) from None


def options(options: pb.ClassifyOptions) -> ClassifyOptions:
    return ClassifyOptions(
        k=options.k if options.HasField("k") else None,
        dimension=options.dimension if options.HasField("dimension") else None,
        voting=voting(options.voting),
        min_similarity=options.min_similarity if options.HasField("min_similarity") else None,
        min_confidence=options.min_confidence if options.HasField("min_confidence") else None,
        temperature=options.temperature if options.HasField("temperature") else None,
    )


def with_vectors(request: pb.ListExemplarsRequest) -> bool:
    """Whether ListExemplars is asked for the exemplars' vectors (its view)."""
    if request.view not in (
        pb.EXEMPLAR_VIEW_UNSPECIFIED,
        pb.EXEMPLAR_VIEW_BASIC,
        pb.EXEMPLAR_VIEW_WITH_VECTORS,
    ):
        raise errors.InvalidArgument(
            f"unknown view {request.view}", reason=errors.Reason.VALUE_OUT_OF_RANGE, field="view"
        )
    with_vectors = request.view == pb.EXEMPLAR_VIEW_WITH_VECTORS
    if request.vector_dimensions and not with_vectors:
        raise errors.InvalidArgument(
            "vector_dimensions needs view EXEMPLAR_VIEW_WITH_VECTORS",
            field="vector_dimensions",
        )
    return with_vectors


_SCOPES: dict[int, bool | None] = {
    pb.EXEMPLAR_SCOPE_UNSPECIFIED: None,
    pb.EXEMPLAR_SCOPE_ALL: None,
    pb.EXEMPLAR_SCOPE_IN_SCOPE: False,
    pb.EXEMPLAR_SCOPE_OUT_OF_SCOPE: True,
}


def exemplar_scope(value: pb.ExemplarScope.ValueType) -> bool | None:
    """The store's ``Selection.out_of_scope`` of an ExemplarScope: None for all exemplars, True
    for the out-of-scope examples only, False for the others."""
    try:
        return _SCOPES[value]
    except KeyError:
        raise errors.InvalidArgument(
            f"unknown scope {value}; use one of EXEMPLAR_SCOPE_ALL, EXEMPLAR_SCOPE_IN_SCOPE and "
            "EXEMPLAR_SCOPE_OUT_OF_SCOPE",
            reason=errors.Reason.VALUE_OUT_OF_RANGE,
            field="scope",
        ) from None


def exemplar(exemplar: Exemplar) -> pb.Exemplar:
    return pb.Exemplar(
        id=exemplar.id,
        text=exemplar.text,
        label=exemplar.label,
        metadata=exemplar.metadata,
        created_at=_timestamp(exemplar.created_at),
        vectors=[
            pb.ExemplarVector(dimension=dimension, values=values)
            for dimension, values in sorted(exemplar.vectors.items())
        ],
        out_of_scope=exemplar.out_of_scope,
    )


def _timestamp(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def classifier(info: ClassifierInfo) -> pb.Classifier:
    config = info.config
    return pb.Classifier(
        name=config.name,
        instruction=config.instruction,
        k=config.k,
        voting=VOTING_TO_PB[config.voting],
        min_similarity=config.min_similarity,
        min_confidence=config.min_confidence,
        created_at=_timestamp(config.created_at),
        exemplar_count=info.exemplar_count,
        temperature=config.temperature,
        dimension=config.dimension,
        calibrated=config.calibration is not None,
        etag=config.etag,
        calibration=(
            pb.Calibration(
                shares=config.calibration.shares,
                probabilities=config.calibration.probabilities,
                label_temperature=config.label_temperature,
            )
            if config.calibration
            else None
        ),
        out_of_scope_threshold=out_of_scope_threshold(config.out_of_scope),
    )


def prediction(result: Vote, include_neighbours: bool) -> pb.Prediction:
    prediction = pb.Prediction(
        label=result.label or "",
        unknown=result.label is None,
        unknown_reason=(
            _REASON_TO_PB[result.unknown_reason]
            if result.unknown_reason
            else pb.UNKNOWN_REASON_UNSPECIFIED
        ),
        confidence=result.confidence,
        scores=[pb.LabelScore(label=label, score=score) for label, score in result.scores],
        top_similarity=result.top_similarity,
        candidates=result.candidates,
    )
    check = result.out_of_scope
    if check is not None:
        prediction.out_of_scope.CopyFrom(
            pb.OutOfScopeCheck(
                score=check.score, threshold=check.threshold, target_coverage=check.target_coverage
            )
        )
    if include_neighbours:
        prediction.neighbours.extend(
            pb.Neighbour(
                id=n.id,
                label=n.label,
                text=n.text,
                similarity=n.similarity,
                out_of_scope=n.out_of_scope,
            )
            for n in result.voters
        )
    return prediction
