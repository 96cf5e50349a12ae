"""Client and AsyncClient: typed wrappers over the generated stub, one method per RPC.

Both take the server address once, an API key sent with every call (``api_key``), TLS
settings (``tls``), a default deadline for every call (``timeout``, seconds) that each method
can override, and raise :class:`KnnClassifierError` subclasses instead of ``grpc.RpcError``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from . import _requests as build
from ._errors import from_rpc_error
from ._requests import ExemplarLike, VotingName

Response = TypeVar("Response")
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Tls:
    """TLS for the channel: the CA that signed the server's certificate (None: the system's),
    and for mutual TLS the client's own PEM key and certificate chain."""

    root_certificates: bytes | None = None
    private_key: bytes | None = None
    certificate_chain: bytes | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def _metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


class Client:
    """Blocking client. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: Tls | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        channel: grpc.Channel | None = None,
    ) -> None:
        if channel is None:
            channel = (
                grpc.secure_channel(target, tls.credentials())
                if tls
                else grpc.insecure_channel(target)
            )
        self._channel = channel
        self._stub = pb_grpc.ClassifierServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = _metadata(api_key)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(
        self, method: Callable[..., Response], request: Any, timeout: float | None
    ) -> Response:
        try:
            deadline = self._timeout if timeout is None else timeout
            return method(request, timeout=deadline, metadata=self._metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None

    def create_classifier(
        self,
        name: str,
        *,
        instruction: str = "",
        k: int | None = None,
        voting: VotingName | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> pb.Classifier:
        request = build.create_classifier(
            name, instruction, k, voting, min_similarity, min_confidence, temperature
        )
        return self._call(self._stub.CreateClassifier, request, timeout)

    def get_classifier(self, name: str, *, timeout: float | None = None) -> pb.Classifier:
        return self._call(self._stub.GetClassifier, pb.GetClassifierRequest(name=name), timeout)

    def list_classifiers(self, *, timeout: float | None = None) -> list[pb.Classifier]:
        response = self._call(self._stub.ListClassifiers, pb.ListClassifiersRequest(), timeout)
        return list(response.classifiers)

    def delete_classifier(self, name: str, *, timeout: float | None = None) -> int:
        request = pb.DeleteClassifierRequest(name=name)
        return self._call(self._stub.DeleteClassifier, request, timeout).deleted_exemplars

    def add_exemplars(
        self, classifier: str, exemplars: Iterable[ExemplarLike], *, timeout: float | None = None
    ) -> list[str]:
        """Adds ``exemplars`` (messages or ``(text, label)`` pairs); returns their ids."""
        request = build.add_exemplars(classifier, exemplars)
        return list(self._call(self._stub.AddExemplars, request, timeout).ids)

    def delete_exemplars(
        self,
        classifier: str,
        *,
        ids: Sequence[str] = (),
        label: str = "",
        timeout: float | None = None,
    ) -> int:
        request = pb.DeleteExemplarsRequest(classifier=classifier, ids=ids, label=label)
        return self._call(self._stub.DeleteExemplars, request, timeout).deleted

    def list_exemplars(
        self,
        classifier: str,
        *,
        page_size: int | None = None,
        page_token: str = "",
        label: str = "",
        timeout: float | None = None,
    ) -> pb.ListExemplarsResponse:
        request = pb.ListExemplarsRequest(
            classifier=classifier, page_size=page_size, page_token=page_token, label=label
        )
        return self._call(self._stub.ListExemplars, request, timeout)

    def list_labels(self, classifier: str, *, timeout: float | None = None) -> dict[str, int]:
        """Label -> number of exemplars, most exemplars first."""
        request = pb.ListLabelsRequest(classifier=classifier)
        response = self._call(self._stub.ListLabels, request, timeout)
        return {item.label: item.count for item in response.labels}

    def classify(
        self,
        classifier: str,
        text: str,
        *,
        k: int | None = None,
        dimension: int | None = None,
        voting: VotingName | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        include_neighbours: bool = False,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> pb.Prediction:
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        request = pb.ClassifyRequest(classifier=classifier, text=text, options=options)
        return self._call(self._stub.Classify, request, timeout).prediction

    def classify_batch(
        self,
        classifier: str,
        texts: Sequence[str],
        *,
        k: int | None = None,
        dimension: int | None = None,
        voting: VotingName | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        include_neighbours: bool = False,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> list[pb.Prediction]:
        """One prediction per text; one that could not be classified has ``error`` set."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        request = pb.ClassifyBatchRequest(classifier=classifier, texts=texts, options=options)
        return list(self._call(self._stub.ClassifyBatch, request, timeout).predictions)

    def evaluate(
        self,
        classifier: str,
        *,
        held_out: Iterable[tuple[str, str]] = (),
        k: Iterable[int] = (),
        voting: Iterable[VotingName] = (),
        dimension: Iterable[int] = (),
        temperature: Iterable[float] = (),
        apply_best: bool = False,
        target_precision: float | None = None,
        timeout: float | None = None,
    ) -> pb.EvaluateResponse:
        """Scores a sweep of settings by leave-one-out, or on ``held_out`` (text, label) pairs.

        With ``target_precision``, the response's ``thresholds`` says whether it was met and the
        precision and coverage the classifier's thresholds give on leave-one-out."""
        request = build.evaluate(
            classifier, held_out, k, voting, dimension, temperature, apply_best, target_precision
        )
        return self._call(self._stub.Evaluate, request, timeout)


class AsyncClient:
    """``asyncio`` client. Use as an async context manager, or await :meth:`close`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: Tls | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is None:
            channel = (
                grpc.aio.secure_channel(target, tls.credentials())
                if tls
                else grpc.aio.insecure_channel(target)
            )
        self._channel = channel
        self._stub = pb_grpc.ClassifierServiceStub(self._channel)
        self._timeout = timeout
        self._metadata = _metadata(api_key)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close(None)

    async def _call(
        self, method: Callable[..., Awaitable[Response]], request: Any, timeout: float | None
    ) -> Response:
        try:
            deadline = self._timeout if timeout is None else timeout
            return await method(request, timeout=deadline, metadata=self._metadata)
        except grpc.aio.AioRpcError as error:
            raise from_rpc_error(error) from None

    async def create_classifier(
        self,
        name: str,
        *,
        instruction: str = "",
        k: int | None = None,
        voting: VotingName | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> pb.Classifier:
        request = build.create_classifier(
            name, instruction, k, voting, min_similarity, min_confidence, temperature
        )
        return await self._call(self._stub.CreateClassifier, request, timeout)

    async def get_classifier(self, name: str, *, timeout: float | None = None) -> pb.Classifier:
        request = pb.GetClassifierRequest(name=name)
        return await self._call(self._stub.GetClassifier, request, timeout)

    async def list_classifiers(self, *, timeout: float | None = None) -> list[pb.Classifier]:
        request = pb.ListClassifiersRequest()
        return list((await self._call(self._stub.ListClassifiers, request, timeout)).classifiers)

    async def delete_classifier(self, name: str, *, timeout: float | None = None) -> int:
        request = pb.DeleteClassifierRequest(name=name)
        response = await self._call(self._stub.DeleteClassifier, request, timeout)
        return response.deleted_exemplars

    async def add_exemplars(
        self, classifier: str, exemplars: Iterable[ExemplarLike], *, timeout: float | None = None
    ) -> list[str]:
        """Adds ``exemplars`` (messages or ``(text, label)`` pairs); returns their ids."""
        request = build.add_exemplars(classifier, exemplars)
        return list((await self._call(self._stub.AddExemplars, request, timeout)).ids)

    async def delete_exemplars(
        self,
        classifier: str,
        *,
        ids: Sequence[str] = (),
        label: str = "",
        timeout: float | None = None,
    ) -> int:
        request = pb.DeleteExemplarsRequest(classifier=classifier, ids=ids, label=label)
        return (await self._call(self._stub.DeleteExemplars, request, timeout)).deleted

    async def list_exemplars(
        self,
        classifier: str,
        *,
        page_size: int | None = None,
        page_token: str = "",
        label: str = "",
        timeout: float | None = None,
    ) -> pb.ListExemplarsResponse:
        request = pb.ListExemplarsRequest(
            classifier=classifier, page_size=page_size, page_token=page_token, label=label
        )
        return await self._call(self._stub.ListExemplars, request, timeout)

    async def list_labels(self, classifier: str, *, timeout: float | None = None) -> dict[str, int]:
        """Label -> number of exemplars, most exemplars first."""
        request = pb.ListLabelsRequest(classifier=classifier)
        response = await self._call(self._stub.ListLabels, request, timeout)
        return {item.label: item.count for item in response.labels}

    async def classify(
        self,
        classifier: str,
        text: str,
        *,
        k: int | None = None,
        dimension: int | None = None,
        voting: VotingName | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        include_neighbours: bool = False,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> pb.Prediction:
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        request = pb.ClassifyRequest(classifier=classifier, text=text, options=options)
        return (await self._call(self._stub.Classify, request, timeout)).prediction

    async def classify_batch(
        self,
        classifier: str,
        texts: Sequence[str],
        *,
        k: int | None = None,
        dimension: int | None = None,
        voting: VotingName | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        include_neighbours: bool = False,
        temperature: float | None = None,
        timeout: float | None = None,
    ) -> list[pb.Prediction]:
        """One prediction per text; one that could not be classified has ``error`` set."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        request = pb.ClassifyBatchRequest(classifier=classifier, texts=texts, options=options)
        return list((await self._call(self._stub.ClassifyBatch, request, timeout)).predictions)

    async def evaluate(
        self,
        classifier: str,
        *,
        held_out: Iterable[tuple[str, str]] = (),
        k: Iterable[int] = (),
        voting: Iterable[VotingName] = (),
        dimension: Iterable[int] = (),
        temperature: Iterable[float] = (),
        apply_best: bool = False,
        target_precision: float | None = None,
        timeout: float | None = None,
    ) -> pb.EvaluateResponse:
        """Scores a sweep of settings by leave-one-out, or on ``held_out`` (text, label) pairs.

        With ``target_precision``, the response's ``thresholds`` says whether it was met and the
        precision and coverage the classifier's thresholds give on leave-one-out."""
        request = build.evaluate(
            classifier, held_out, k, voting, dimension, temperature, apply_best, target_precision
        )
        return await self._call(self._stub.Evaluate, request, timeout)
