"""Domain errors of the transport-free core.

Each kind names the gRPC status it becomes; the servicer maps them in one place
(:mod:`statuses`), walking the class hierarchy, so a subclass keeps its parent's status. The
message is meant for the caller: it says what was wrong and what to change, and never carries
internals. Beside it, an error carries what a caller's code branches on (AIP-193): a
:class:`Reason` (each class has a default), metadata such as the limit that was passed, the
request fields at fault, the resource concerned, and whether retrying the same request later
can help.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar


class Reason(enum.StrEnum):
    """The ``ErrorReason`` values of proto/knn_classifier/v1/error_reason.proto (a test keeps
    the two equal); each value's comment there says when it is used."""

    INVALID_REQUEST = "INVALID_REQUEST"
    MALFORMED_REQUEST = "MALFORMED_REQUEST"
    FIELD_REQUIRED = "FIELD_REQUIRED"
    TEXT_TOO_LONG = "TEXT_TOO_LONG"
    VALUE_TOO_LONG = "VALUE_TOO_LONG"
    TOO_MANY_ITEMS = "TOO_MANY_ITEMS"
    VALUE_OUT_OF_RANGE = "VALUE_OUT_OF_RANGE"
    INVALID_NAME = "INVALID_NAME"
    DIMENSION_NOT_CONFIGURED = "DIMENSION_NOT_CONFIGURED"
    INVALID_PAGE_TOKEN = "INVALID_PAGE_TOKEN"
    INPUT_REJECTED_BY_MODEL = "INPUT_REJECTED_BY_MODEL"
    FIELD_NOT_UPDATABLE = "FIELD_NOT_UPDATABLE"
    TOO_MANY_NEIGHBOURS = "TOO_MANY_NEIGHBOURS"
    CLASSIFIER_NOT_FOUND = "CLASSIFIER_NOT_FOUND"
    CLASSIFIER_ALREADY_EXISTS = "CLASSIFIER_ALREADY_EXISTS"
    CLASSIFIER_EMPTY = "CLASSIFIER_EMPTY"
    CLASSIFIER_NOT_READY = "CLASSIFIER_NOT_READY"
    EMBEDDER_MISMATCH = "EMBEDDER_MISMATCH"
    VECTORS_TOO_NARROW = "VECTORS_TOO_NARROW"
    EXEMPLAR_LIMIT_REACHED = "EXEMPLAR_LIMIT_REACHED"
    RESPONSE_TOO_LARGE = "RESPONSE_TOO_LARGE"
    EMBEDDING_QUEUE_FULL = "EMBEDDING_QUEUE_FULL"
    TOO_MANY_CALLS = "TOO_MANY_CALLS"
    STORAGE_FULL = "STORAGE_FULL"
    CONCURRENT_CHANGE = "CONCURRENT_CHANGE"
    ETAG_MISMATCH = "ETAG_MISMATCH"
    CLASSIFIER_BUSY = "CLASSIFIER_BUSY"
    EMBEDDER_UNAVAILABLE = "EMBEDDER_UNAVAILABLE"
    STORE_UNAVAILABLE = "STORE_UNAVAILABLE"
    SERVICE_STARTING = "SERVICE_STARTING"
    DEADLINE_PASSED = "DEADLINE_PASSED"
    API_KEY_INVALID = "API_KEY_INVALID"
    WRITE_KEY_REQUIRED = "WRITE_KEY_REQUIRED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """A request field at fault: its path (``exemplars[3].text``) and what is wrong with it."""

    field: str
    description: str


@dataclass(frozen=True, slots=True)
class Resource:
    """The resource an error concerns, e.g. ``Resource("knn_classifier.v1.Classifier", name)``."""

    type: str
    name: str


CLASSIFIER = "knn_classifier.v1.Classifier"


def classifier(name: str) -> Resource:
    return Resource(CLASSIFIER, name)


class ServiceError(Exception):
    """Base of the errors a caller can act on.

    ``reason`` defaults to the class's; ``metadata`` values become strings; ``field`` is a
    shorthand for one violation of that field described by the message; ``retry_after_s`` is
    set when retrying the same request later can succeed (the class's default otherwise).
    """

    default_reason: ClassVar[Reason] = Reason.INVALID_REQUEST
    default_retry_after_s: ClassVar[float | None] = None

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        metadata: Mapping[str, str | int | float] | None = None,
        field: str | None = None,
        violations: Sequence[FieldViolation] = (),
        resource: Resource | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = {key: str(value) for key, value in (metadata or {}).items()}
        self.violations = list(violations)
        if field is not None:
            self.violations.insert(0, FieldViolation(field, message))
        self.resource = resource
        self.retry_after_s = self.default_retry_after_s if retry_after_s is None else retry_after_s


class InvalidArgument(ServiceError):
    """The request is malformed or out of bounds."""


class NotFound(ServiceError):
    """The named classifier does not exist."""

    default_reason = Reason.CLASSIFIER_NOT_FOUND


class AlreadyExists(ServiceError):
    """The classifier to create exists already."""

    default_reason = Reason.CLASSIFIER_ALREADY_EXISTS


class FailedPrecondition(ServiceError):
    """The request is valid but the classifier is not in a state to serve it."""

    default_reason = Reason.CLASSIFIER_NOT_READY


class ResourceExhausted(ServiceError):
    """A limit is reached; the message names it."""

    default_reason = Reason.EXEMPLAR_LIMIT_REACHED


class Aborted(ServiceError):
    """A concurrent change conflicts; re-read and retry.

    No retry hint by default: retrying the same request blindly may write into a classifier
    that was deleted and re-created meanwhile, so the caller decides.
    """

    default_reason = Reason.CONCURRENT_CHANGE


class Unavailable(ServiceError):
    """A dependency (the store, unless a subclass says otherwise) cannot be reached; retrying
    later may help."""

    default_reason = Reason.STORE_UNAVAILABLE
    default_retry_after_s = 1.0


class EmbedderUnavailable(Unavailable):
    """The embedding server failed or cannot be reached."""

    default_reason = Reason.EMBEDDER_UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The work could not finish within the caller's deadline."""

    default_reason = Reason.DEADLINE_PASSED


class StartupError(Exception):
    """The service cannot start as configured; the message says what to change."""
