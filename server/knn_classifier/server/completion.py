"""Writes that run to their end even when their caller leaves."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def completed(write: Coroutine[Any, Any, T]) -> T:
    """Runs ``write`` to its end even if the caller is cancelled (its deadline passed, or it
    hung up): stopped between two dimensions, a write would leave exemplars in some only, and
    a delete would leave its classifier marked "deleting". The caller still gets its
    cancellation; a failure after it is logged."""
    task = asyncio.ensure_future(write)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_log_failure_after_cancel)
        raise


def _log_failure_after_cancel(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("a write finished after its caller left, with %r", task.exception())
