"""Request builders shared by Client and AsyncClient, so both speak the API the same way."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Literal, TypeAlias

from knn_classifier.v1 import classifier_pb2 as pb

VotingName: TypeAlias = Literal[
    "majority", "similarity_weighted", "softmax", "centroid", "discriminant", "mixture"
]
ExemplarLike: TypeAlias = pb.ExemplarInput | tuple[str, str]
"""An exemplar: a message, or a ``(text, label)`` pair."""

_VOTING: dict[str, pb.Voting.ValueType] = {
    "majority": pb.VOTING_MAJORITY,
    "similarity_weighted": pb.VOTING_SIMILARITY_WEIGHTED,
    "softmax": pb.VOTING_SOFTMAX,
    "centroid": pb.VOTING_CENTROID,
    "discriminant": pb.VOTING_DISCRIMINANT,
    "mixture": pb.VOTING_MIXTURE,
}


def voting(name: VotingName | None) -> pb.Voting.ValueType:
    if name is None:
        return pb.VOTING_UNSPECIFIED
    try:
        return _VOTING[name]
    except KeyError:
        raise ValueError(f"voting must be one of {sorted(_VOTING)}, not {name!r}") from None


def voting_name(value: pb.Voting.ValueType) -> str:
    """The name of a voting method, as :func:`voting` takes it ("unspecified" for none)."""
    for name, number in _VOTING.items():
        if number == value:
            return name
    return "unspecified" if value == pb.VOTING_UNSPECIFIED else str(value)


def create_classifier(
    name: str,
    instruction: str,
    k: int | None,
    voting_name: VotingName | None,
    min_similarity: float | None,
    min_confidence: float | None,
    temperature: float | None,
) -> pb.CreateClassifierRequest:
    return pb.CreateClassifierRequest(
        name=name,
        instruction=instruction,
        k=k,
        voting=voting(voting_name),
        min_similarity=min_similarity,
        min_confidence=min_confidence,
        temperature=temperature,
    )


def exemplar(item: ExemplarLike, metadata: Mapping[str, str] | None = None) -> pb.ExemplarInput:
    if isinstance(item, pb.ExemplarInput):
        return item
    text, label = item
    return pb.ExemplarInput(text=text, label=label, metadata=metadata)


def add_exemplars(
    classifier: str, items: Iterable[ExemplarLike], etag: str
) -> pb.AddExemplarsRequest:
    return pb.AddExemplarsRequest(
        classifier=classifier, exemplars=[exemplar(i) for i in items], etag=etag
    )


def classify_options(
    k: int | None,
    dimension: int | None,
    voting_name: VotingName | None,
    min_similarity: float | None,
    min_confidence: float | None,
    include_neighbours: bool,
    temperature: float | None,
) -> pb.ClassifyOptions:
    return pb.ClassifyOptions(
        k=k,
        dimension=dimension,
        voting=voting(voting_name),
        min_similarity=min_similarity,
        min_confidence=min_confidence,
        include_neighbours=include_neighbours,
        temperature=temperature,
    )


def evaluate(
    classifier: str,
    held_out: Iterable[tuple[str, str]],
    out_of_scope: Iterable[str],
    k: Iterable[int],
    votings: Iterable[VotingName],
    dimensions: Iterable[int],
    temperatures: Iterable[float],
    apply_best: bool,
    target_precision: float | None,
    target_coverage: float | None,
    etag: str,
) -> pb.EvaluateRequest:
    return pb.EvaluateRequest(
        classifier=classifier,
        held_out_texts=[pb.LabelledText(text=text, label=label) for text, label in held_out]
        + [pb.LabelledText(text=text, out_of_scope=True) for text in out_of_scope],
        k_values=k,
        voting_methods=[voting(v) for v in votings],
        dimensions=dimensions,
        temperatures=temperatures,
        apply_best=apply_best,
        target_precision=target_precision,
        target_coverage=target_coverage,
        etag=etag,
    )


def delete_exemplars(
    classifier: str, ids: Sequence[str], label: str, etag: str
) -> pb.DeleteExemplarsRequest:
    """Ids or a label (a oneof: the request cannot carry both); the server refuses neither."""
    if ids and label:
        raise ValueError("give ids or a label to delete, not both")
    request = pb.DeleteExemplarsRequest(classifier=classifier, etag=etag)
    if ids:
        request.ids.ids.extend(ids)
    if label:
        request.label = label
    return request


def update_classifier(
    name: str,
    etag: str,
    k: int | None,
    voting_name: VotingName | None,
    temperature: float | None,
    min_similarity: float | None,
    min_confidence: float | None,
    dimension: int | None,
) -> pb.UpdateClassifierRequest:
    """The update mask names exactly the fields given (not None)."""
    classifier = pb.Classifier(name=name, etag=etag)
    paths: list[str] = []
    if k is not None:
        classifier.k = k
        paths.append("k")
    if voting_name is not None:
        classifier.voting = voting(voting_name)
        paths.append("voting")
    if temperature is not None:
        classifier.temperature = temperature
        paths.append("temperature")
    if min_similarity is not None:
        classifier.min_similarity = min_similarity
        paths.append("min_similarity")
    if min_confidence is not None:
        classifier.min_confidence = min_confidence
        paths.append("min_confidence")
    if dimension is not None:
        classifier.dimension = dimension
        paths.append("dimension")
    request = pb.UpdateClassifierRequest(classifier=classifier)
    request.update_mask.paths.extend(paths)
    return request
