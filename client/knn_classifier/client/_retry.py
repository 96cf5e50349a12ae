"""The client's retry policy: which failures to retry, and how long to wait in between.

Only the methods the proto marks NO_SIDE_EFFECTS or IDEMPOTENT are retried
(:data:`IDEMPOTENT_METHODS`): GetClassifier, ListClassifiers, UpdateClassifier, AddExemplars (ids
are derived from the text, or given), DeleteExemplars, ListExemplars, ListLabels, Classify,
ClassifyBatch and GetServiceInfo. Never CreateClassifier and DeleteClassifier (a retry after a
lost answer would fail with ALREADY_EXISTS / NOT_FOUND) nor Evaluate (costly, and it may apply
settings).

A failure is retried only if it is :attr:`~KnnClassifierError.retryable`: the server attached a
RetryInfo (the embedder or store is down, the embedding queue is full), or the transport failed
before the server answered (UNAVAILABLE without details). Validation errors, missing
classifiers, limits and deadlines are never retried. Waits grow exponentially with full jitter,
at least the server's retry delay, and every attempt shares the call's one deadline.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from google.protobuf import descriptor_pb2

from knn_classifier.v1 import classifier_pb2 as pb

from ._errors import KnnClassifierError

IDEMPOTENT_METHODS = frozenset(
    method.name
    for method in pb.DESCRIPTOR.services_by_name["ClassifierService"].methods
    if method.GetOptions().idempotency_level != descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN
)


@dataclass(frozen=True)
class RetryPolicy:
    """How the client retries idempotent calls. ``RetryPolicy(max_attempts=1)`` turns it off."""

    max_attempts: int = 3
    """Attempts in all, the first included."""
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def delay(self, attempt: int, error: KnnClassifierError, time_left: float) -> float | None:
        """Seconds to wait before retrying after failed ``attempt`` (0 for the first), or None
        to give up: the error is not retryable, the attempts are spent, or the wait would not
        leave time before the deadline."""
        if attempt + 1 >= self.max_attempts or not error.retryable:
            return None
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**attempt)
        wait = max(error.retry_delay or 0.0, random.uniform(0.0, backoff))
        return wait if wait < time_left else None
