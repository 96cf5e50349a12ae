"""Client and AsyncClient: typed wrappers over the generated stub, one method per RPC.

Each method is described once in :mod:`_requests` (its request, and its result from the
response); the two clients only send the descriptions, blocking or with ``await``, and
tests/test_client_parity.py keeps their methods and parameters the same.

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
from google.protobuf.message import Message

from knn_classifier.v1 import classifier_pb2 as pb
from knn_classifier.v1 import classifier_pb2_grpc as pb_grpc

from . import _requests as build
from ._errors import AlreadyExistsError, from_rpc_error
from ._existing import matching
from ._requests import Call, ExemplarLike, Listing, ScopeName, VotingName
from ._results import AddedExemplars, ClassifiedBatch, DeletedExemplars, LabelCounts
from ._retry import IDEMPOTENT_METHODS, RetryPolicy

Response = TypeVar("Response")
Result = TypeVar("Result")
Item = TypeVar("Item")
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

    def _send(self, call: Call[Message, Result], timeout: float | None) -> Result:
        return call.result(self._call(getattr(self._stub, call.method), call.request, timeout))

    def _pages(self, listing: Listing[Item], timeout: float | None) -> Iterator[Item]:
        """Every item of ``listing``, page after page (``timeout`` per page)."""
        for response in self._responses(listing, timeout):
            yield from listing.items(response)

    def _responses(self, listing: Listing[Item], timeout: float | None) -> Iterator[Any]:
        """Every page's response of ``listing`` (``timeout`` per page)."""
        method = getattr(self._stub, listing.method)
        token = ""
        while True:
            response = self._call(method, listing.page(token), timeout)
            yield response
            token = response.next_page_token
            if not token:
                return

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
        dimension: int | None = None,
        calibration: pb.Calibration | None = None,
        embedder_fingerprint: str = "",
        out_of_scope_threshold: pb.OutOfScopeThreshold | None = None,
        exist_ok: bool = False,
        timeout: float | None = None,
    ) -> pb.Classifier:
        """Creates a classifier; settings left out take the server's defaults.

        With ``exist_ok``, a classifier of that name that has every setting given here is
        returned as it is; one with other settings raises :class:`SettingsMismatchError`.
        ``calibration`` restores an exported ``Classifier.calibration``, with the
        ``embedder_fingerprint`` of the server it came from and the ``dimension`` it was fitted
        at (the server refuses it for another embedder). ``out_of_scope_threshold`` restores an
        exported ``Classifier.out_of_scope_threshold`` the same way, with the same
        ``embedder_fingerprint``.
        """
        call = build.create_classifier(
            name,
            instruction,
            k,
            voting,
            min_similarity,
            min_confidence,
            temperature,
            dimension,
            calibration,
            embedder_fingerprint,
            out_of_scope_threshold,
        )
        try:
            return self._send(call, timeout)
        except AlreadyExistsError:
            if not exist_ok:
                raise
        return matching(call.request, self.get_classifier(name, timeout=timeout))

    def get_classifier(self, name: str, *, timeout: float | None = None) -> pb.Classifier:
        return self._send(build.get_classifier(name), timeout)

    def list_classifiers(self, *, timeout: float | None = None) -> list[pb.Classifier]:
        """Every classifier by name, reading page after page (``timeout`` per page)."""
        return list(self._pages(build.list_classifiers(), timeout))

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
        call = build.update_classifier(
            name, etag, k, voting, temperature, min_similarity, min_confidence, dimension
        )
        return self._send(call, timeout)

    def delete_classifier(self, name: str, *, etag: str = "", timeout: float | None = None) -> int:
        return self._send(build.delete_classifier(name, etag), timeout)

    def get_service_info(self, *, timeout: float | None = None) -> pb.ServiceInfo:
        """The server's dimensions, embedding model, limits and API version."""
        return self._send(build.get_service_info(), timeout)

    def add_exemplars(
        self,
        classifier: str,
        exemplars: Iterable[ExemplarLike],
        *,
        etag: str = "",
        embedder_fingerprint: str = "",
        timeout: float | None = None,
    ) -> AddedExemplars:
        """Adds ``exemplars`` (messages or ``(text, label)`` pairs); returns their ids (a list
        whose ``etag`` is the classifier's after the write). Messages may carry the vectors
        listed with ``with_vectors`` on a server of the same embedder, whose
        ``embedder_fingerprint`` is then required: they are stored without embedding."""
        call = build.add_exemplars(classifier, exemplars, etag, embedder_fingerprint)
        return self._send(call, timeout)

    def add_out_of_scope(
        self,
        classifier: str,
        texts: Iterable[str | tuple[str, str]],
        *,
        etag: str = "",
        timeout: float | None = None,
    ) -> AddedExemplars:
        """Adds out-of-scope examples (texts, or ``(text, topic)`` pairs, the topic for
        reporting only): texts like them are answered unknown. About 10 per recurring
        off-topic subject help most. Returns their ids, as :meth:`add_exemplars`."""
        return self._send(build.add_out_of_scope(classifier, texts, etag), timeout)

    def delete_exemplars(
        self,
        classifier: str,
        *,
        ids: Sequence[str] = (),
        label: str = "",
        scope: ScopeName = "all",
        etag: str = "",
        timeout: float | None = None,
    ) -> DeletedExemplars:
        """Deletes by ids or by label, of those only the in-scope exemplars or only the
        out-of-scope examples with ``scope`` ``"in_scope"`` or ``"out_of_scope"``; with neither
        ids nor a label, every exemplar of such a scope. Returns how many (an int whose ``etag``
        is the classifier's after the delete)."""
        call = build.delete_exemplars(classifier, ids, label, etag, scope)
        return self._send(call, timeout)

    def list_exemplars(
        self,
        classifier: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        label: str = "",
        scope: ScopeName = "all",
        with_vectors: bool = False,
        vector_dimensions: Sequence[int] = (),
        timeout: float | None = None,
    ) -> pb.ListExemplarsResponse:
        """One page: at most ``page_size`` exemplars (0: the server's default), fewer if they
        would not fit the server's response budget. Pass ``next_page_token`` back for the next
        (with the same ``label`` and ``scope``). ``scope``: ``"all"``, ``"in_scope"`` or
        ``"out_of_scope"`` exemplars. ``with_vectors``: each exemplar with its stored vectors of
        ``vector_dimensions`` (empty: every dimension the server keeps), and the response with
        the embedder's fingerprint."""
        call = build.list_exemplars(
            classifier, page_size, page_token, label, with_vectors, vector_dimensions, scope
        )
        return self._send(call, timeout)

    def iter_exemplars(
        self,
        classifier: str,
        *,
        label: str = "",
        scope: ScopeName = "all",
        timeout: float | None = None,
    ) -> Iterator[pb.Exemplar]:
        """Every exemplar (of ``label``, if given, and of ``scope``), page after page
        (``timeout`` per page)."""
        yield from self._pages(build.all_exemplars(classifier, label, scope), timeout)

    def list_labels(self, classifier: str, *, timeout: float | None = None) -> LabelCounts:
        """Label -> number of exemplars, most exemplars first (every page; ``timeout`` each;
        a dict whose ``etag`` is the classifier's when the first page was read).
        Out-of-scope examples are in no label: :meth:`count_out_of_scope` counts them."""
        return LabelCounts.of(list(self._responses(build.list_labels(classifier), timeout)))

    def count_out_of_scope(self, classifier: str, *, timeout: float | None = None) -> int:
        """How many out-of-scope examples the classifier holds."""
        return self._send(build.count_out_of_scope(classifier), timeout)

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
        """The answer for ``text``; ``classify_batch([text]).etag`` also says which revision of
        the classifier gave it."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        return self._send(build.classify(classifier, text, options), timeout)

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
    ) -> ClassifiedBatch:
        """One result per text, in order: its prediction, or for a text that could not be
        classified (empty, too long, refused by the model) the error it would have raised
        alone, returned rather than raised (a list whose ``etag`` is the classifier's revision
        that answered). Errors of the whole call are raised."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        return self._send(build.classify_batch(classifier, texts, options), timeout)

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
        leave_out_twins: bool | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> pb.EvaluateResponse:
        """Scores a sweep of settings by leave-one-out, or on ``held_out`` (text, label) pairs
        and ``out_of_scope`` texts (which belong to no label: each result's ``out_of_scope``
        then measures how they are told apart).

        With ``target_precision``, the response's ``thresholds`` says whether it was met and the
        precision and coverage the classifier's thresholds give on leave-one-out. With
        ``apply_best``, the out-of-scope threshold is fitted to keep ``target_coverage`` of the
        leave-one-out exemplars (default 0.98). Leave-one-out leaves each exemplar's
        near-duplicates out with it unless ``leave_out_twins`` is False (None: the server's
        default, True)."""
        call = build.evaluate(
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
            leave_out_twins,
            etag,
        )
        return self._send(call, timeout)

    def check_exemplars(
        self,
        classifier: str,
        *,
        min_confidence: float | None = None,
        min_duplicate_similarity: float | None = None,
        min_label_exemplars: int | None = None,
        max_items: int = 0,
        timeout: float | None = None,
    ) -> pb.CheckExemplarsResponse:
        """The exemplar hygiene report: exemplars that leave-one-out confidently gives another
        label, near-duplicates across labels (at least ``min_duplicate_similarity`` alike),
        labels taken for each other, and labels with fewer than ``min_label_exemplars``
        exemplars; at most ``max_items`` of each (0: the server's default), the ``*_found``
        fields counting them all. Settings left None take the server's defaults."""
        call = build.check_exemplars(
            classifier, min_confidence, min_duplicate_similarity, min_label_exemplars, max_items
        )
        return self._send(call, timeout)


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

    async def _send(self, call: Call[Message, Result], timeout: float | None) -> Result:
        response = await self._call(getattr(self._stub, call.method), call.request, timeout)
        return call.result(response)

    async def _pages(self, listing: Listing[Item], timeout: float | None) -> AsyncIterator[Item]:
        """Every item of ``listing``, page after page (``timeout`` per page)."""
        async for response in self._responses(listing, timeout):
            for item in listing.items(response):
                yield item

    async def _responses(self, listing: Listing[Item], timeout: float | None) -> AsyncIterator[Any]:
        """Every page's response of ``listing`` (``timeout`` per page)."""
        method = getattr(self._stub, listing.method)
        token = ""
        while True:
            response = await self._call(method, listing.page(token), timeout)
            yield response
            token = response.next_page_token
            if not token:
                return

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
        dimension: int | None = None,
        calibration: pb.Calibration | None = None,
        embedder_fingerprint: str = "",
        out_of_scope_threshold: pb.OutOfScopeThreshold | None = None,
        exist_ok: bool = False,
        timeout: float | None = None,
    ) -> pb.Classifier:
        """Creates a classifier; settings left out take the server's defaults.

        With ``exist_ok``, a classifier of that name that has every setting given here is
        returned as it is; one with other settings raises :class:`SettingsMismatchError`.
        ``calibration`` restores an exported ``Classifier.calibration``, with the
        ``embedder_fingerprint`` of the server it came from and the ``dimension`` it was fitted
        at (the server refuses it for another embedder). ``out_of_scope_threshold`` restores an
        exported ``Classifier.out_of_scope_threshold`` the same way, with the same
        ``embedder_fingerprint``.
        """
        call = build.create_classifier(
            name,
            instruction,
            k,
            voting,
            min_similarity,
            min_confidence,
            temperature,
            dimension,
            calibration,
            embedder_fingerprint,
            out_of_scope_threshold,
        )
        try:
            return await self._send(call, timeout)
        except AlreadyExistsError:
            if not exist_ok:
                raise
        return matching(call.request, await self.get_classifier(name, timeout=timeout))

    async def get_classifier(self, name: str, *, timeout: float | None = None) -> pb.Classifier:
        return await self._send(build.get_classifier(name), timeout)

    async def list_classifiers(self, *, timeout: float | None = None) -> list[pb.Classifier]:
        """Every classifier by name, reading page after page (``timeout`` per page)."""
        return [c async for c in self._pages(build.list_classifiers(), timeout)]

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
        call = build.update_classifier(
            name, etag, k, voting, temperature, min_similarity, min_confidence, dimension
        )
        return await self._send(call, timeout)

    async def delete_classifier(
        self, name: str, *, etag: str = "", timeout: float | None = None
    ) -> int:
        return await self._send(build.delete_classifier(name, etag), timeout)

    async def get_service_info(self, *, timeout: float | None = None) -> pb.ServiceInfo:
        """The server's dimensions, embedding model, limits and API version."""
        return await self._send(build.get_service_info(), timeout)

    async def add_exemplars(
        self,
        classifier: str,
        exemplars: Iterable[ExemplarLike],
        *,
        etag: str = "",
        embedder_fingerprint: str = "",
        timeout: float | None = None,
    ) -> AddedExemplars:
        """Adds ``exemplars`` (messages or ``(text, label)`` pairs); returns their ids (a list
        whose ``etag`` is the classifier's after the write). Messages may carry the vectors
        listed with ``with_vectors`` on a server of the same embedder, whose
        ``embedder_fingerprint`` is then required: they are stored without embedding."""
        call = build.add_exemplars(classifier, exemplars, etag, embedder_fingerprint)
        return await self._send(call, timeout)

    async def add_out_of_scope(
        self,
        classifier: str,
        texts: Iterable[str | tuple[str, str]],
        *,
        etag: str = "",
        timeout: float | None = None,
    ) -> AddedExemplars:
        """Adds out-of-scope examples (texts, or ``(text, topic)`` pairs, the topic for
        reporting only): texts like them are answered unknown. About 10 per recurring
        off-topic subject help most. Returns their ids, as :meth:`add_exemplars`."""
        return await self._send(build.add_out_of_scope(classifier, texts, etag), timeout)

    async def delete_exemplars(
        self,
        classifier: str,
        *,
        ids: Sequence[str] = (),
        label: str = "",
        scope: ScopeName = "all",
        etag: str = "",
        timeout: float | None = None,
    ) -> DeletedExemplars:
        """Deletes by ids or by label, of those only the in-scope exemplars or only the
        out-of-scope examples with ``scope`` ``"in_scope"`` or ``"out_of_scope"``; with neither
        ids nor a label, every exemplar of such a scope. Returns how many (an int whose ``etag``
        is the classifier's after the delete)."""
        call = build.delete_exemplars(classifier, ids, label, etag, scope)
        return await self._send(call, timeout)

    async def list_exemplars(
        self,
        classifier: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        label: str = "",
        scope: ScopeName = "all",
        with_vectors: bool = False,
        vector_dimensions: Sequence[int] = (),
        timeout: float | None = None,
    ) -> pb.ListExemplarsResponse:
        """One page: at most ``page_size`` exemplars (0: the server's default), fewer if they
        would not fit the server's response budget. Pass ``next_page_token`` back for the next
        (with the same ``label`` and ``scope``). ``scope``: ``"all"``, ``"in_scope"`` or
        ``"out_of_scope"`` exemplars. ``with_vectors``: each exemplar with its stored vectors of
        ``vector_dimensions`` (empty: every dimension the server keeps), and the response with
        the embedder's fingerprint."""
        call = build.list_exemplars(
            classifier, page_size, page_token, label, with_vectors, vector_dimensions, scope
        )
        return await self._send(call, timeout)

    async def iter_exemplars(
        self,
        classifier: str,
        *,
        label: str = "",
        scope: ScopeName = "all",
        timeout: float | None = None,
    ) -> AsyncIterator[pb.Exemplar]:
        """Every exemplar (of ``label``, if given, and of ``scope``), page after page
        (``timeout`` per page)."""
        listing = build.all_exemplars(classifier, label, scope)
        async for exemplar in self._pages(listing, timeout):
            yield exemplar

    async def list_labels(self, classifier: str, *, timeout: float | None = None) -> LabelCounts:
        """Label -> number of exemplars, most exemplars first (every page; ``timeout`` each;
        a dict whose ``etag`` is the classifier's when the first page was read).
        Out-of-scope examples are in no label: :meth:`count_out_of_scope` counts them."""
        listing = build.list_labels(classifier)
        return LabelCounts.of([page async for page in self._responses(listing, timeout)])

    async def count_out_of_scope(self, classifier: str, *, timeout: float | None = None) -> int:
        """How many out-of-scope examples the classifier holds."""
        return await self._send(build.count_out_of_scope(classifier), timeout)

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
        """The answer for ``text``; ``classify_batch([text]).etag`` also says which revision of
        the classifier gave it."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        return await self._send(build.classify(classifier, text, options), timeout)

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
    ) -> ClassifiedBatch:
        """One result per text, in order: its prediction, or for a text that could not be
        classified (empty, too long, refused by the model) the error it would have raised
        alone, returned rather than raised (a list whose ``etag`` is the classifier's revision
        that answered). Errors of the whole call are raised."""
        options = build.classify_options(
            k, dimension, voting, min_similarity, min_confidence, include_neighbours, temperature
        )
        return await self._send(build.classify_batch(classifier, texts, options), timeout)

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
        leave_out_twins: bool | None = None,
        etag: str = "",
        timeout: float | None = None,
    ) -> pb.EvaluateResponse:
        """Scores a sweep of settings by leave-one-out, or on ``held_out`` (text, label) pairs
        and ``out_of_scope`` texts (which belong to no label: each result's ``out_of_scope``
        then measures how they are told apart).

        With ``target_precision``, the response's ``thresholds`` says whether it was met and the
        precision and coverage the classifier's thresholds give on leave-one-out. With
        ``apply_best``, the out-of-scope threshold is fitted to keep ``target_coverage`` of the
        leave-one-out exemplars (default 0.98). Leave-one-out leaves each exemplar's
        near-duplicates out with it unless ``leave_out_twins`` is False (None: the server's
        default, True)."""
        call = build.evaluate(
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
            leave_out_twins,
            etag,
        )
        return await self._send(call, timeout)

    async def check_exemplars(
        self,
        classifier: str,
        *,
        min_confidence: float | None = None,
        min_duplicate_similarity: float | None = None,
        min_label_exemplars: int | None = None,
        max_items: int = 0,
        timeout: float | None = None,
    ) -> pb.CheckExemplarsResponse:
        """The exemplar hygiene report: exemplars that leave-one-out confidently gives another
        label, near-duplicates across labels (at least ``min_duplicate_similarity`` alike),
        labels taken for each other, and labels with fewer than ``min_label_exemplars``
        exemplars; at most ``max_items`` of each (0: the server's default), the ``*_found``
        fields counting them all. Settings left None take the server's defaults."""
        call = build.check_exemplars(
            classifier, min_confidence, min_duplicate_similarity, min_label_exemplars, max_items
        )
        return await self._send(call, timeout)
