"""Exceptions raised by the client: one class per gRPC status a caller handles differently.

Each carries what the server's status details say (AIP-193), so code can branch on them instead
of on the message: ``reason`` (a name of the proto's ``ErrorReason``, e.g.
``"CLASSIFIER_NOT_FOUND"``), ``metadata`` (e.g. the limit that was passed), ``field_violations``
(the request fields at fault) and ``retry_delay`` (set when retrying the same request later can
succeed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

from knn_classifier.v1 import classifier_pb2 as pb

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """A request field at fault, as a path such as ``exemplars[3].text``, and why."""

    field: str
    description: str


class KnnClassifierError(Exception):
    """A call failed. ``code`` is the gRPC status, ``details`` the server's explanation."""

    def __init__(
        self,
        code: grpc.StatusCode,
        details: str,
        *,
        reason: str = "",
        metadata: dict[str, str] | None = None,
        field_violations: Iterable[FieldViolation] = (),
        resource_name: str = "",
        retry_delay: float | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.reason = reason
        """The ``ErrorReason`` name; empty if the status had no details (e.g. from the
        transport, or a limit enforced by gRPC itself)."""
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)
        self.resource_name = resource_name
        """The resource concerned (NOT_FOUND, ALREADY_EXISTS): the classifier's name."""
        self.retry_delay = retry_delay
        """Seconds to wait at least before retrying; None if retrying cannot help."""

    @property
    def retryable(self) -> bool:
        """Whether sending the same request again may succeed: the server said so (RetryInfo),
        or the transport failed (UNAVAILABLE without details: the server was not reached, or
        the connection broke)."""
        if self.retry_delay is not None:
            return True
        return self.code == grpc.StatusCode.UNAVAILABLE and not self.reason


class InvalidArgumentError(KnnClassifierError):
    """The request was malformed or out of bounds; fix it before retrying."""


class NotFoundError(KnnClassifierError):
    """The classifier does not exist."""


class AlreadyExistsError(KnnClassifierError):
    """The classifier to create exists already."""


class SettingsMismatchError(AlreadyExistsError):
    """``create_classifier(..., exist_ok=True)`` found the classifier with other settings.

    ``existing`` is the classifier as it is; ``differences`` names each setting that differs.
    """

    def __init__(self, existing: pb.Classifier, differences: list[str]) -> None:
        super().__init__(
            grpc.StatusCode.ALREADY_EXISTS,
            f"classifier {existing.name!r} exists with other settings: "
            f"{'; '.join(differences)}. Create it with the settings it has, or delete it first",
        )
        self.existing = existing
        self.differences = differences


class FailedPreconditionError(KnnClassifierError):
    """The classifier cannot serve the request yet, e.g. it has no exemplars."""


class ResourceExhaustedError(KnnClassifierError):
    """A limit was reached. ``reason`` says which: the classifier's exemplar limit or a
    response too large (retrying cannot help), or an overloaded server (``retryable``)."""


class AbortedError(KnnClassifierError):
    """A concurrent change conflicted with this call: re-read the classifier and retry."""


class UnavailableError(KnnClassifierError):
    """The server or one of its dependencies is down; retry later with backoff."""


class UnauthenticatedError(KnnClassifierError):
    """No API key, or one the server does not know."""


class PermissionDeniedError(KnnClassifierError):
    """The API key may not make this call (a read key asked to write)."""


class DeadlineExceededError(KnnClassifierError):
    """The call did not finish within its deadline."""


_BY_CODE: dict[grpc.StatusCode, type[KnnClassifierError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.ABORTED: AbortedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}
_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def from_rpc_error(error: grpc.RpcError) -> KnnClassifierError:
    """The client exception for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    trailers = cast(Iterable[tuple[str, object]], error.trailing_metadata() or ())
    for key, value in trailers:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return _from_details(code, details, status)
    return _BY_CODE.get(code, KnnClassifierError)(code, details)


def from_status(status: status_pb2.Status) -> KnnClassifierError:
    """The client exception for a ``google.rpc.Status`` (e.g. one text of a ClassifyBatch)."""
    code = _BY_NUMBER.get(status.code, grpc.StatusCode.UNKNOWN)
    return _from_details(code, status.message, status)


def _from_details(
    code: grpc.StatusCode, message: str, status: status_pb2.Status
) -> KnnClassifierError:
    info = error_details_pb2.ErrorInfo()
    bad_request = error_details_pb2.BadRequest()
    resource = error_details_pb2.ResourceInfo()
    retry = error_details_pb2.RetryInfo()
    has_retry = False
    for detail in status.details:
        # Unpack fills the message only if the detail is of its type.
        has_retry |= detail.Unpack(retry)
        detail.Unpack(info) or detail.Unpack(bad_request) or detail.Unpack(resource)
    return _BY_CODE.get(code, KnnClassifierError)(
        code,
        message,
        reason=info.reason,
        metadata=dict(info.metadata),
        field_violations=[
            FieldViolation(v.field, v.description) for v in bad_request.field_violations
        ],
        resource_name=resource.resource_name,
        retry_delay=retry.retry_delay.ToNanoseconds() / 1e9 if has_retry else None,
    )
