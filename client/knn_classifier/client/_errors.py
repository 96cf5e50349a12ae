"""Exceptions raised by the client: one class per gRPC status a caller handles differently."""

from __future__ import annotations

import grpc

from knn_classifier.v1 import classifier_pb2 as pb


class KnnClassifierError(Exception):
    """A call failed. ``code`` is the gRPC status, ``details`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


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
    """The server is at a limit; retry later with backoff."""


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
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}


def from_rpc_error(error: grpc.RpcError) -> KnnClassifierError:
    """The client exception for a failed call (``grpc.RpcError`` or ``grpc.aio.AioRpcError``)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or ""
    return _BY_CODE.get(code, KnnClassifierError)(code, details)
