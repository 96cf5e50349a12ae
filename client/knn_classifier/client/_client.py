"""Client and AsyncClient: typed wrappers over the generated stub, one method per RPC.

Both take the server address once, an API key sent with every call (``api_key``), TLS
settings (``tls``), a default deadline for every call (``timeout``, seconds) that each method
can override, a :class:`RetryPolicy` for idempotent calls (``retry``), and raise
:class:`KnnClassifierError` subclasses instead of ``grpc.RpcError``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self, TypeVar

import grpc

from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from . import _requests as build
from ._errors import AlreadyExistsError, KnnClassifierError, from_rpc_error, from_status
from ._existing import matching
from ._requests import ExemplarLike, VotingName
from ._retry import IDEMPOTENT_METHODS, RetryPolicy

Response = TypeVar("Response")
DEFAULT_TIMEOUT_S = 30.0
DEFAULT_RETRY = RetryPolicy()


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


BatchResult = pb.Prediction | KnnClassifierError
"""One text of classify_batch: its prediction, or the error that text alone would have raised."""


def _batch_results(response: pb.ClassifyBatchResponse) -> list[BatchResult]:
    return [
        from_status(result.error) if result.HasField("error") else result.prediction
        for result in response.results
    ]


class Client:
    """Blocking client. Use as a context manager, or call :meth:`close`."""

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        api_key: str | None = None,
        tls: Tls | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy = DEFAULT_RETRY,
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
        self._retry = retry
        self._retryable = {getattr(self._stub, name) for name in IDEMPOTENT_METHODS}
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
        self,
        method: Callable[..., Response],
        request: Any,
        timeout: float | None,
    ) -> Response:
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                left = deadline - time.monotonic()
                return method(request, timeout=max(left, 0.0), metadata=self._metadata)
            except grpc.RpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            wait = self._retry.delay(attempt, error, deadline - time.monotonic())
            if method not in self._retryable or wait is None:
                raise error from None
            time.sleep(wait)
            attempt += 1

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
        exist_ok: bool = False,
        timeout: float | None = None,
    ) -> pb.Classifier:
        """Creates a classifier; settings left out take the server's defaults.

        With ``exist_ok``, a classifier of that name that has every setting given here is
        returned as it is; one with other settings raises :class:`SettingsMismatchError`.
        """
        request = build.create_classifier(
            name, instruction, k, voting, min_similarity, min_confidence, temperature
        )
        try:
            return self._call(self._stub.CreateClassifier, request, timeout)
        except AlreadyExistsError:
            if not exist_ok:
                raise
        return matching(request, self.get_classifier(name, timeout=timeout))

    def get_classifier(self, name: str, *, timeout: float | None = None) -> pb.Classifier:
        return self._call(self._stub.GetClassifier, pb.GetClassifierRequest(name=name), timeout)

    def list_classifiers(self, *, timeout: float | None = None) -> list[pb.Classifier]:
        """Every classifier by name, reading page after page (``timeout`` per page)."""
        classifiers: list[pb.Classifier] = []
        token = ""
        while True:
            request = pb.ListClassifiersRequest(page_token=token)
            response = self._call(self._stub.ListClassifiers, request, timeout)
            classifiers.extend(response.classifiers)
            token = response.next_page_token
            if not token:
                return classifiers

    def update_classifier(
        self,
        name: str,
        *,
        k: int | None = None,
        voting: VotingName | None = None,
        temperature: float | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        dimension: int | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> pb.Classifier:
        """Changes the defaults given (not None), and nothing else."""
        request = build.update_classifier(
            name, etag, k, voting, temperature, min_similarity, min_confidence, dimension
        )
        return self._call(self._stub.UpdateClassifier, request, timeout)

    def delete_classifier(self, name: str, *, etag: str = "", timeout: float | None = None) -> int:
        request = pb.DeleteClassifierRequest(name=name, etag=etag)
        response = self._call(self._stub.DeleteClassifier, request, timeout)
        return response.deleted_exemplars

    def get_service_info(self, *, timeout: float | None = None) -> pb.ServiceInfo:
        """The server's dimensions, embedding model, limits and API version."""
        return self._call(self._stub.GetServiceInfo, pb.GetServiceInfoRequest(), timeout)

    def add_exemplars(
        self,
        classifier: str,
        exemplars: Iterable[ExemplarLike],
        *,
        etag: str = "",
        timeout: float | None = None,
    ) -> list[str]:
        """Adds ``exemplars`` (messages or ``(text, label)`` pairs); returns their ids."""
        request = build.add_exemplars(classifier, exemplars, etag)
        return list(self._call(self._stub.AddExemplars, request, timeout).ids)

    def delete_exemplars(
        self,
        classifier: str,
        *,
        ids: Sequence[str] = (),
        label: str = "",
        etag: str = "",
        timeout: float | None = None,
    ) -> int:
        request = build.delete_exemplars(classifier, ids, label, etag)
        return self._call(self._stub.DeleteExemplars, request, timeout).deleted

    def list_exemplars(
        self,
        classifier: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        label: str = "",
        timeout: float | None = None,
    ) -> pb.ListExemplarsResponse:
        """One page: at most ``page_size`` exemplars (0: the server's default), fewer if they
        would not fit the server's response budget. Pass ``next_page_token`` back for the next."""
        request = pb.ListExemplarsRequest(
            classifier=classifier, page_size=page_size, page_token=page_token, label=label
        )
        return self._call(self._stub.ListExemplars, request, timeout)

    def iter_exemplars(
        self, classifier: str, *, label: str = "", timeout: float | None = None
    ) -> Iterator[pb.Exemplar]:
        """Every exemplar (of ``label``, if given), page after page (``timeout`` per page)."""
        token = ""
        while True:
            page = self.list_exemplars(
                classifier, page_token=token, label=label, page_size=1000, timeout=timeout
            )
            yield from page.exemplars
            token = page.next_page_token
            if not token:
                return

    def list_labels(self, classifier: str, *, timeout: float | None = None) -> dict[str, int]:
        """Label -> number of exemplars, most exemplars first (every page; ``timeout`` each)."""
        counts: dict[str, int] = {}
        token = ""
        while True:
            request = pb.ListLabelsRequest(classifier=classifier, page_size=1000, page_token=token)
            response = self._call(self._stub.ListLabels, request, timeout)
            counts.update((item.label, item.count) for item in response.labels)
            token = response.next_page_token
            if not token:
                return counts

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
    ) -> list[BatchResult]:
        """One result per text, in order: its prediction, or for a text that could not be
        classified (empty, too long, refused by the model) the error it would have raised
        alone, returned rather than raised. Errors of the whole call are raised."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        request = pb.ClassifyBatchRequest(classifier=classifier, texts=texts, options=options)
        return _batch_results(self._call(self._stub.ClassifyBatch, request, timeout))

    def evaluate(
        self,
        classifier: str,
        *,
        held_out: Iterable[tuple[str, str]] = (),
        out_of_scope: Iterable[str] = (),
        k: Iterable[int] = (),
        voting: Iterable[VotingName] = (),
        dimension: Iterable[int] = (),
        temperature: Iterable[float] = (),
        apply_best: bool = False,
        target_precision: float | None = None,
        target_coverage: float | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> pb.EvaluateResponse:
        """Scores a sweep of settings by leave-one-out, or on ``held_out`` (text, label) pairs
        and ``out_of_scope`` texts (which belong to no label: each result's ``out_of_scope``
        then measures how they are told apart).

        With ``target_precision``, the response's ``thresholds`` says whether it was met and the
        precision and coverage the classifier's thresholds give on leave-one-out. With
        ``apply_best``, the out-of-scope threshold is fitted to keep ``target_coverage`` of the
        leave-one-out exemplars (default 0.98)."""
        request = build.evaluate(
            classifier,
            held_out,
            out_of_scope,
            k,
            voting,
            dimension,
            temperature,
            apply_best,
            target_precision,
            target_coverage,
            etag,
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
        retry: RetryPolicy = DEFAULT_RETRY,
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
        self._retry = retry
        self._retryable = {getattr(self._stub, name) for name in IDEMPOTENT_METHODS}
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
        self,
        method: Callable[..., Awaitable[Response]],
        request: Any,
        timeout: float | None,
    ) -> Response:
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        attempt = 0
        while True:
            try:
                left = deadline - time.monotonic()
                return await method(request, timeout=max(left, 0.0), metadata=self._metadata)
            except grpc.aio.AioRpcError as rpc_error:
                error = from_rpc_error(rpc_error)
            wait = self._retry.delay(attempt, error, deadline - time.monotonic())
            if method not in self._retryable or wait is None:
                raise error from None
            await asyncio.sleep(wait)
            attempt += 1

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
        exist_ok: bool = False,
        timeout: float | None = None,
    ) -> pb.Classifier:
        """Creates a classifier; settings left out take the server's defaults.

        With ``exist_ok``, a classifier of that name that has every setting given here is
        returned as it is; one with other settings raises :class:`SettingsMismatchError`.
        """
        request = build.create_classifier(
            name, instruction, k, voting, min_similarity, min_confidence, temperature
        )
        try:
            return await self._call(self._stub.CreateClassifier, request, timeout)
        except AlreadyExistsError:
            if not exist_ok:
                raise
        return matching(request, await self.get_classifier(name, timeout=timeout))

    async def get_classifier(self, name: str, *, timeout: float | None = None) -> pb.Classifier:
        request = pb.GetClassifierRequest(name=name)
        return await self._call(self._stub.GetClassifier, request, timeout)

    async def list_classifiers(self, *, timeout: float | None = None) -> list[pb.Classifier]:
        """Every classifier by name, reading page after page (``timeout`` per page)."""
        classifiers: list[pb.Classifier] = []
        token = ""
        while True:
            request = pb.ListClassifiersRequest(page_token=token)
            response = await self._call(self._stub.ListClassifiers, request, timeout)
            classifiers.extend(response.classifiers)
            token = response.next_page_token
            if not token:
                return classifiers

    async def update_classifier(
        self,
        name: str,
        *,
        k: int | None = None,
        voting: VotingName | None = None,
        temperature: float | None = None,
        min_similarity: float | None = None,
        min_confidence: float | None = None,
        dimension: int | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> pb.Classifier:
        """Changes the defaults given (not None), and nothing else."""
        request = build.update_classifier(
            name, etag, k, voting, temperature, min_similarity, min_confidence, dimension
        )
        return await self._call(self._stub.UpdateClassifier, request, timeout)

    async def delete_classifier(
        self, name: str, *, etag: str = "", timeout: float | None = None
    ) -> int:
        request = pb.DeleteClassifierRequest(name=name, etag=etag)
        response = await self._call(self._stub.DeleteClassifier, request, timeout)
        return response.deleted_exemplars

    async def get_service_info(self, *, timeout: float | None = None) -> pb.ServiceInfo:
        """The server's dimensions, embedding model, limits and API version."""
        request = pb.GetServiceInfoRequest()
        return await self._call(self._stub.GetServiceInfo, request, timeout)

    async def add_exemplars(
        self,
        classifier: str,
        exemplars: Iterable[ExemplarLike],
        *,
        etag: str = "",
        timeout: float | None = None,
    ) -> list[str]:
        """Adds ``exemplars`` (messages or ``(text, label)`` pairs); returns their ids."""
        request = build.add_exemplars(classifier, exemplars, etag)
        return list((await self._call(self._stub.AddExemplars, request, timeout)).ids)

    async def delete_exemplars(
        self,
        classifier: str,
        *,
        ids: Sequence[str] = (),
        label: str = "",
        etag: str = "",
        timeout: float | None = None,
    ) -> int:
        request = build.delete_exemplars(classifier, ids, label, etag)
        return (await self._call(self._stub.DeleteExemplars, request, timeout)).deleted

    async def list_exemplars(
        self,
        classifier: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        label: str = "",
        timeout: float | None = None,
    ) -> pb.ListExemplarsResponse:
        """One page: at most ``page_size`` exemplars (0: the server's default), fewer if they
        would not fit the server's response budget. Pass ``next_page_token`` back for the next."""
        request = pb.ListExemplarsRequest(
            classifier=classifier, page_size=page_size, page_token=page_token, label=label
        )
        return await self._call(self._stub.ListExemplars, request, timeout)

    async def iter_exemplars(
        self, classifier: str, *, label: str = "", timeout: float | None = None
    ) -> AsyncIterator[pb.Exemplar]:
        """Every exemplar (of ``label``, if given), page after page (``timeout`` per page)."""
        token = ""
        while True:
            page = await self.list_exemplars(
                classifier, page_token=token, label=label, page_size=1000, timeout=timeout
            )
            for exemplar in page.exemplars:
                yield exemplar
            token = page.next_page_token
            if not token:
                return

    async def list_labels(self, classifier: str, *, timeout: float | None = None) -> dict[str, int]:
        """Label -> number of exemplars, most exemplars first (every page; ``timeout`` each)."""
        counts: dict[str, int] = {}
        token = ""
        while True:
            request = pb.ListLabelsRequest(classifier=classifier, page_size=1000, page_token=token)
            response = await self._call(self._stub.ListLabels, request, timeout)
            counts.update((item.label, item.count) for item in response.labels)
            token = response.next_page_token
            if not token:
                return counts

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
    ) -> list[BatchResult]:
        """One result per text, in order: its prediction, or for a text that could not be
        classified (empty, too long, refused by the model) the error it would have raised
        alone, returned rather than raised. Errors of the whole call are raised."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        request = pb.ClassifyBatchRequest(classifier=classifier, texts=texts, options=options)
        return _batch_results(await self._call(self._stub.ClassifyBatch, request, timeout))

    async def evaluate(
        self,
        classifier: str,
        *,
        held_out: Iterable[tuple[str, str]] = (),
        out_of_scope: Iterable[str] = (),
        k: Iterable[int] = (),
        voting: Iterable[VotingName] = (),
        dimension: Iterable[int] = (),
        temperature: Iterable[float] = (),
        apply_best: bool = False,
        target_precision: float | None = None,
        target_coverage: float | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> pb.EvaluateResponse:
        """Scores a sweep of settings by leave-one-out, or on ``held_out`` (text, label) pairs
        and ``out_of_scope`` texts (which belong to no label: each result's ``out_of_scope``
        then measures how they are told apart).

        With ``target_precision``, the response's ``thresholds`` says whether it was met and the
        precision and coverage the classifier's thresholds give on leave-one-out. With
        ``apply_best``, the out-of-scope threshold is fitted to keep ``target_coverage`` of the
        leave-one-out exemplars (default 0.98)."""
        request = build.evaluate(
            classifier,
            held_out,
            out_of_scope,
            k,
            voting,
            dimension,
            temperature,
            apply_best,
            target_precision,
            target_coverage,
            etag,
        )
        return await self._call(self._stub.Evaluate, request, timeout)
