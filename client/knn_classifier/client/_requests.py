"""What each client method sends and returns, shared by Client and AsyncClient.

A method is described once here, as a :class:`Call` (one RPC: its request and how the response
becomes the method's result) or a :class:`Listing` (a list read page after page); each client
then only sends it, blocking or with ``await``. So both clients speak the API the same way, and
a fix to a request or a result is made once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

from google.protobuf.message import Message

from knn_classifier.v1 import classifier_pb2 as pb

from ._errors import KnnClassifierError, from_status
from ._results import AddedExemplars, ClassifiedBatch, DeletedExemplars

Request = TypeVar("Request", bound=Message, covariant=True)
Result = TypeVar("Result")
Item = TypeVar("Item")

VOTING_NAMES: tuple[str, ...] = tuple(
    name.removeprefix("VOTING_").lower()
    for name, number in pb.Voting.items()
    if number != pb.VOTING_UNSPECIFIED
)
"""The voting methods, as the client takes them: the proto's ``Voting`` values in lower case
without their prefix (``VOTING_SOFTMAX``: ``"softmax"``). Derived from the proto, so a method
the server adds needs no change here."""
VotingName: TypeAlias = str
"""A name of :data:`VOTING_NAMES`."""
SCOPE_NAMES: tuple[str, ...] = tuple(
    name.removeprefix("EXEMPLAR_SCOPE_").lower()
    for name, number in pb.ExemplarScope.items()
    if number != pb.EXEMPLAR_SCOPE_UNSPECIFIED
)
"""Which exemplars delete_exemplars and list_exemplars touch, as the client takes them: the
proto's ``ExemplarScope`` values in lower case without their prefix (``"all"``, ``"in_scope"``,
``"out_of_scope"``)."""
ScopeName: TypeAlias = str
"""A name of :data:`SCOPE_NAMES`."""
ExemplarLike: TypeAlias = pb.ExemplarInput | tuple[str, str]
"""An exemplar: a message, or a ``(text, label)`` pair."""
BatchResult: TypeAlias = pb.Prediction | KnnClassifierError
"""One text of classify_batch: its prediction, or the error that text alone would have raised."""

_VOTING = {name: pb.Voting.Value(f"VOTING_{name.upper()}") for name in VOTING_NAMES}
_SCOPE = {name: pb.ExemplarScope.Value(f"EXEMPLAR_SCOPE_{name.upper()}") for name in SCOPE_NAMES}


@dataclass(frozen=True)
class Call(Generic[Request, Result]):
    """One RPC: the stub method's name, the request, and the method's result from the response."""

    method: str
    request: Request
    result: Callable[[Any], Result]


@dataclass(frozen=True)
class Listing(Generic[Item]):
    """A list read page after page, until a response has no ``next_page_token``."""

    method: str
    page: Callable[[str], Message]
    """The request for the page at a token ("" for the first)."""
    items: Callable[[Any], Iterable[Item]]
    """The items of a page's response."""


def voting(name: VotingName | None) -> pb.Voting.ValueType:
    if name is None:
        return pb.VOTING_UNSPECIFIED
    try:
        return _VOTING[name]
    except KeyError:
        raise ValueError(f"voting must be one of {', '.join(VOTING_NAMES)}, not {name!r}") from None


def scope(name: ScopeName) -> pb.ExemplarScope.ValueType:
    try:
        return _SCOPE[name]
    except KeyError:
        raise ValueError(f"scope must be one of {', '.join(SCOPE_NAMES)}, not {name!r}") from None


def voting_name(value: pb.Voting.ValueType) -> str:
    """The name of a voting method, as :func:`voting` takes it ("unspecified" for none)."""
    for name, number in _VOTING.items():
        if number == value:
            return name
    return "unspecified" if value == pb.VOTING_UNSPECIFIED else str(value)


def _response(response: Result) -> Result:
    return response


def create_classifier(
    name: str,
    instruction: str,
    k: int | None,
    voting_name: VotingName | None,
    min_similarity: float | None,
    min_confidence: float | None,
    temperature: float | None,
    dimension: int | None = None,
    calibration: pb.Calibration | None = None,
    embedder_fingerprint: str = "",
    out_of_scope_threshold: pb.OutOfScopeThreshold | None = None,
) -> Call[pb.CreateClassifierRequest, pb.Classifier]:
    """``dimension``, ``calibration``, ``out_of_scope_threshold`` and ``embedder_fingerprint``
    restore an exported one."""
    request = pb.CreateClassifierRequest(
        name=name,
        instruction=instruction,
        k=k,
        voting=voting(voting_name),
        min_similarity=min_similarity,
        min_confidence=min_confidence,
        temperature=temperature,
        dimension=dimension,
        calibration=calibration,
        embedder_fingerprint=embedder_fingerprint,
        out_of_scope_threshold=out_of_scope_threshold,
    )
    return Call("CreateClassifier", request, _response)


def get_classifier(name: str) -> Call[pb.GetClassifierRequest, pb.Classifier]:
    return Call("GetClassifier", pb.GetClassifierRequest(name=name), _response)


def list_classifiers() -> Listing[pb.Classifier]:
    return Listing(
        "ListClassifiers",
        lambda token: pb.ListClassifiersRequest(page_token=token),
        lambda response: response.classifiers,
    )


def update_classifier(
    name: str,
    etag: str,
    k: int | None,
    voting_name: VotingName | None,
    temperature: float | None,
    min_similarity: float | None,
    min_confidence: float | None,
    dimension: int | None,
) -> Call[pb.UpdateClassifierRequest, pb.Classifier]:
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
    return Call("UpdateClassifier", request, _response)


def delete_classifier(name: str, etag: str) -> Call[pb.DeleteClassifierRequest, int]:
    request = pb.DeleteClassifierRequest(name=name, etag=etag)
    return Call("DeleteClassifier", request, lambda response: response.deleted_exemplars)


def get_service_info() -> Call[pb.GetServiceInfoRequest, pb.ServiceInfo]:
    return Call("GetServiceInfo", pb.GetServiceInfoRequest(), _response)


def exemplar(item: ExemplarLike, metadata: Mapping[str, str] | None = None) -> pb.ExemplarInput:
    if isinstance(item, pb.ExemplarInput):
        return item
    text, label = item
    return pb.ExemplarInput(text=text, label=label, metadata=metadata)


def add_exemplars(
    classifier: str, items: Iterable[ExemplarLike], etag: str, embedder_fingerprint: str = ""
) -> Call[pb.AddExemplarsRequest, AddedExemplars]:
    request = pb.AddExemplarsRequest(
        classifier=classifier,
        exemplars=[exemplar(i) for i in items],
        etag=etag,
        embedder_fingerprint=embedder_fingerprint,
    )
    return Call(
        "AddExemplars", request, lambda response: AddedExemplars(response.ids, response.etag)
    )


def add_out_of_scope(
    classifier: str, items: Iterable[str | tuple[str, str]], etag: str
) -> Call[pb.AddExemplarsRequest, AddedExemplars]:
    """Texts, or ``(text, topic)`` pairs, added as out-of-scope examples."""
    inputs = [
        pb.ExemplarInput(text=item, out_of_scope=True)
        if isinstance(item, str)
        else pb.ExemplarInput(text=item[0], label=item[1], out_of_scope=True)
        for item in items
    ]
    return add_exemplars(classifier, inputs, etag)


def delete_exemplars(
    classifier: str, ids: Sequence[str], label: str, etag: str, scope_name: ScopeName = "all"
) -> Call[pb.DeleteExemplarsRequest, DeletedExemplars]:
    """Ids or a label (a oneof: the request cannot carry both); the server refuses neither
    unless the scope is in_scope or out_of_scope."""
    if ids and label:
        raise ValueError("give ids or a label to delete, not both")
    request = pb.DeleteExemplarsRequest(classifier=classifier, etag=etag, scope=scope(scope_name))
    if ids:
        request.ids.ids.extend(ids)
    if label:
        request.label = label
    return Call(
        "DeleteExemplars",
        request,
        lambda response: DeletedExemplars(response.deleted, response.etag),
    )


def list_exemplars(
    classifier: str,
    page_size: int,
    page_token: str,
    label: str,
    with_vectors: bool = False,
    vector_dimensions: Sequence[int] = (),
    scope_name: ScopeName = "all",
) -> Call[pb.ListExemplarsRequest, pb.ListExemplarsResponse]:
    request = pb.ListExemplarsRequest(
        classifier=classifier,
        page_size=page_size,
        page_token=page_token,
        label=label,
        view=pb.EXEMPLAR_VIEW_WITH_VECTORS if with_vectors else pb.EXEMPLAR_VIEW_UNSPECIFIED,
        vector_dimensions=vector_dimensions,
        scope=scope(scope_name),
    )
    return Call("ListExemplars", request, _response)


def all_exemplars(
    classifier: str, label: str, scope_name: ScopeName = "all"
) -> Listing[pb.Exemplar]:
    return Listing(
        "ListExemplars",
        lambda token: list_exemplars(classifier, 1000, token, label, scope_name=scope_name).request,
        lambda response: response.exemplars,
    )


def list_labels(classifier: str) -> Listing[tuple[str, int]]:
    return Listing(
        "ListLabels",
        lambda token: pb.ListLabelsRequest(classifier=classifier, page_size=1000, page_token=token),
        lambda response: ((item.label, item.count) for item in response.labels),
    )


def count_out_of_scope(classifier: str) -> Call[pb.ListLabelsRequest, int]:
    request = pb.ListLabelsRequest(classifier=classifier, page_size=1)
    return Call("ListLabels", request, lambda response: response.out_of_scope_exemplars)


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


def classify(
    classifier: str, text: str, options: pb.ClassifyOptions
) -> Call[pb.ClassifyRequest, pb.Prediction]:
    request = pb.ClassifyRequest(classifier=classifier, text=text, options=options)
    return Call("Classify", request, lambda response: response.prediction)


def classify_batch(
    classifier: str, texts: Sequence[str], options: pb.ClassifyOptions
) -> Call[pb.ClassifyBatchRequest, ClassifiedBatch]:
    request = pb.ClassifyBatchRequest(classifier=classifier, texts=texts, options=options)
    return Call("ClassifyBatch", request, _batch_results)


def _batch_results(response: pb.ClassifyBatchResponse) -> ClassifiedBatch:
    results = (
        from_status(result.error) if result.HasField("error") else result.prediction
        for result in response.results
    )
    return ClassifiedBatch(results, response.etag)


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
    leave_out_twins: bool | None,
    etag: str,
) -> Call[pb.EvaluateRequest, pb.EvaluateResponse]:
    request = pb.EvaluateRequest(
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
        leave_out_twins=leave_out_twins,
        etag=etag,
    )
    return Call("Evaluate", request, _response)


def check_exemplars(
    classifier: str,
    min_confidence: float | None,
    min_duplicate_similarity: float | None,
    min_label_exemplars: int | None,
    max_items: int,
) -> Call[pb.CheckExemplarsRequest, pb.CheckExemplarsResponse]:
    request = pb.CheckExemplarsRequest(
        classifier=classifier,
        min_confidence=min_confidence,
        min_duplicate_similarity=min_duplicate_similarity,
        min_label_exemplars=min_label_exemplars,
        max_items=max_items,
    )
    return Call("CheckExemplars", request, _response)
