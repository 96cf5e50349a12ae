"""Rejects requests that are not valid protobuf with INVALID_ARGUMENT.

gRPC answers a request it cannot deserialise with UNKNOWN, which tells the caller nothing. This
interceptor takes the bytes itself, parses them with the method's own deserialiser, and answers
INVALID_ARGUMENT when that fails.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from . import statuses
from .errors import Reason
from .interception import Context, Handler, MadeOnce, ServerInterceptor


class RejectMalformedRequests(ServerInterceptor):
    def __init__(self) -> None:
        self._guarding = MadeOnce(self._guard)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        if handler is None or handler.unary_unary is None or handler.request_deserializer is None:
            return handler
        return self._guarding(handler, details.method)

    @staticmethod
    def _guard(handler: Handler, full_method: str) -> Handler:
        parse = handler.request_deserializer
        assert parse is not None
        # On an aio server the behaviour is a coroutine function taking an aio context.
        behaviour = cast(Callable[[Any, Context], Awaitable[Any]], handler.unary_unary)
        method = full_method.rsplit("/", 1)[-1]

        async def guarded(raw: bytes, context: Context) -> Any:
            try:
                request = parse(raw)
            except (DecodeError, ValueError, TypeError):
                await statuses.abort(
                    context,
                    statuses.status(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"the {method} request is not valid protobuf",
                        Reason.MALFORMED_REQUEST,
                    ),
                )
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, response_serializer=handler.response_serializer
        )
