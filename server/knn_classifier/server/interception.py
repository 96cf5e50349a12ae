"""The grpc.aio types every server interceptor of this package uses, named once."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"

if TYPE_CHECKING:
    ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # not subscriptable at run time
    ServerInterceptor = grpc.aio.ServerInterceptor


class MadeOnce:
    """The handlers an interceptor made, by method.

    grpc.aio runs the interceptor chain for every call, and the handler an interceptor wraps is
    the same object for a method from one call to the next, so its wrapper is made once, not
    per call. Another handler below (the starting gate's refusal, then the real one) makes a
    new wrapper. At most ``limit`` methods are kept: refused calls may name any method.
    """

    def __init__(self, make: Callable[[Handler, str], Handler], limit: int = 256) -> None:
        self._make = make
        self._limit = limit
        self._made: dict[str, tuple[Handler, Handler]] = {}

    def __call__(self, handler: Handler, method: str) -> Handler:
        made = self._made.get(method)
        if made is not None and made[0] is handler:
            return made[1]
        wrapped = self._make(handler, method)
        if len(self._made) >= self._limit:
            self._made.clear()
        self._made[method] = (handler, wrapped)
        return wrapped
