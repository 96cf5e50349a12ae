"""Admission: at most ``max_concurrent_rpcs`` calls are served at once; more are refused.

gRPC's own ``maximum_concurrent_rpcs`` refuses with a bare RESOURCE_EXHAUSTED that a client
cannot tell from a limit it must not retry (a message too large, a full classifier). This
call step refuses with the reason TOO_MANY_CALLS and a RetryInfo instead, so that clients
retry overload, and only overload, after a short delay. Health checks are always admitted.
"""

from __future__ import annotations

from typing import Any, cast

import grpc

from . import statuses
from .errors import Reason
from .interception import Behaviour, Context, Handler, unary

RETRY_AFTER_S = 0.1
_HEALTH = "/grpc.health.v1.Health/"


class LimitConcurrentCalls:
    """The admission step (see interception): wraps every unary method but health's."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._active = 0
        self._refusal = statuses.status(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the server is serving its limit of {limit} calls at once; retry shortly",
            Reason.TOO_MANY_CALLS,
            metadata={"limit": str(limit)},
            retry_after_s=RETRY_AFTER_S,
        )

    def __call__(self, handler: Handler, method: str) -> Handler:
        if handler.unary_unary is None or method.startswith(_HEALTH):
            return handler
        behaviour = cast(Behaviour, handler.unary_unary)

        async def admitted(request: Any, context: Context) -> Any:
            if self._active >= self._limit:
                await statuses.abort(context, self._refusal)
            self._active += 1
            try:
                return await behaviour(request, context)
            finally:
                self._active -= 1

        return unary(handler, admitted)
