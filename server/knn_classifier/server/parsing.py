"""Rejects requests that are not valid protobuf with INVALID_ARGUMENT.

gRPC answers a request it cannot deserialise with UNKNOWN, which tells the caller nothing. This
call step takes the bytes itself, parses them with the method's own deserialiser, and answers
INVALID_ARGUMENT when that fails.
"""

from __future__ import annotations

from typing import Any, cast

import grpc
from google.protobuf.message import DecodeError

from . import statuses
from .errors import Reason
from .interception import Behaviour, Context, Handler


class RejectMalformedRequests:
    """The parsing step of the unary methods that take a message (see interception)."""

    def __call__(self, handler: Handler, full_method: str) -> Handler:
        parse = handler.request_deserializer
        if handler.unary_unary is None or parse is None:
            return handler
        # On an aio server the behaviour is a coroutine function taking an aio context.
        behaviour = cast(Behaviour, handler.unary_unary)
        malformed = statuses.status(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the {full_method.rsplit('/', 1)[-1]} request is not valid protobuf",
            Reason.MALFORMED_REQUEST,
        )

        async def guarded(raw: bytes, context: Context) -> Any:
            try:
                request = parse(raw)
            except (DecodeError, ValueError, TypeError):
                await statuses.abort(context, malformed)
            return await behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            guarded, response_serializer=handler.response_serializer
        )
