"""What health knows of the embedder without asking it: its last answer and the calls waiting."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class CallRecord:
    """When a call last got a usable answer (monotonic clock) and how many calls are in flight.

    A failed call clears the success: it no longer shows the server up, so health asks again.
    """

    def __init__(self) -> None:
        self._answered_at: float | None = None
        self.in_flight = 0

    @contextmanager
    def call(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def answered(self) -> None:
        self._answered_at = time.monotonic()

    def failed(self) -> None:
        self._answered_at = None

    def answered_since(self, moment: float) -> bool:
        """Whether a call was answered after ``moment`` (monotonic) and none failed since."""
        return self._answered_at is not None and self._answered_at > moment
