"""The caller's gRPC deadline, carried to the code that waits on other services.

The servicer sets it for the duration of a call (:func:`within`); the embedder and long
computations read it (:func:`remaining`, :func:`check`), so no work starts that the caller will
no longer wait for, and no retry outlives the call.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .errors import DeadlineExceeded

_deadline: ContextVar[float | None] = ContextVar("deadline", default=None)


@contextmanager
def within(seconds: float | None) -> Iterator[None]:
    """Runs the block under a deadline ``seconds`` from now (None: no deadline)."""
    token = _deadline.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        _deadline.reset(token)


def remaining() -> float | None:
    """Seconds left before the deadline, or None if there is none."""
    deadline = _deadline.get()
    return None if deadline is None else deadline - time.monotonic()


def check(what: str) -> None:
    """Raises DeadlineExceeded if the deadline has passed, before ``what`` starts."""
    left = remaining()
    if left is not None and left <= 0:
        raise DeadlineExceeded(f"the deadline passed before {what}")
