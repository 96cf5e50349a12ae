"""Python client of the knn-classifier gRPC service.

>>> from knn_classifier.client import Client
>>> with Client("localhost:50051") as client:
...     client.create_classifier("intents", exist_ok=True)
...     client.add_exemplars("intents", [("where is my card?", "card_arrival")])
...     prediction = client.classify("intents", "my card has not come yet")
"""

from knn_classifier.v1.classifier_pb2 import (
    Classifier,
    Exemplar,
    ExemplarInput,
    LabelScore,
    Neighbour,
    Prediction,
    ServiceInfo,
    UnknownReason,
)

from ._client import AsyncClient, Client, Tls
from ._errors import (
    AbortedError,
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    KnnClassifierError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    SettingsMismatchError,
    UnauthenticatedError,
    UnavailableError,
)
from ._requests import BatchResult
from ._results import AddedExemplars, ClassifiedBatch, DeletedExemplars, LabelCounts
from ._retry import RetryPolicy

__all__ = [
    "AbortedError",
    "AddedExemplars",
    "AlreadyExistsError",
    "AsyncClient",
    "BatchResult",
    "ClassifiedBatch",
    "Classifier",
    "Client",
    "DeadlineExceededError",
    "DeletedExemplars",
    "Exemplar",
    "ExemplarInput",
    "FailedPreconditionError",
    "FieldViolation",
    "InvalidArgumentError",
    "KnnClassifierError",
    "LabelCounts",
    "LabelScore",
    "Neighbour",
    "NotFoundError",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ServiceInfo",
    "SettingsMismatchError",
    "Tls",
    "UnauthenticatedError",
    "UnavailableError",
    "UnknownReason",
]
