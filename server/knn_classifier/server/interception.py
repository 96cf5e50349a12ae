"""How the call steps (telemetry, admission, API keys, the start-up gate, parsing) reach a call.

A step is a function of a method's handler and full name (``/package.Service/Method``) that
returns the handler to serve the method with: a wrapper doing the step's work around the handler,
or the handler itself where the step does not apply. grpc.aio's own server interceptors would
run for every call, each resolving the method's handler again; here each method's handler is
wrapped in the steps once, when its servicer is registered (:class:`Registration`), and a call
runs the wrapped handler directly. Methods no servicer registers are answered UNIMPLEMENTED
through the same steps, so unknown and refused calls are counted and logged like the others.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import grpc

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Behaviour: TypeAlias = Callable[[Any, Context], Awaitable[Any]]
"""A unary method's implementation on an aio server: a coroutine function of request, context."""
Step: TypeAlias = Callable[[Handler, str], Handler]

if TYPE_CHECKING:
    GenericHandler = grpc.GenericRpcHandler[Any, Any]
else:  # not subscriptable at run time
    GenericHandler = grpc.GenericRpcHandler


def with_steps(steps: Sequence[Step], handler: Handler, method: str) -> Handler:
    """``handler`` wrapped in ``steps``, the first step outermost (the first to see a call)."""
    for step in reversed(steps):
        handler = step(handler, method)
    return handler


def unary(handler: Handler, behaviour: Behaviour) -> Handler:
    """A unary handler running ``behaviour`` with ``handler``'s (de)serialisers."""
    return grpc.unary_unary_rpc_method_handler(
        behaviour,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class Registration:
    """Stands in for the server in the generated ``add_*Servicer_to_server`` functions: each
    method is registered by its full name, its handler wrapped in ``steps`` once."""

    def __init__(self, server: grpc.aio.Server, steps: Sequence[Step]) -> None:
        self._server = server
        self._steps = tuple(steps)

    def register(self, add: Callable[[Any, Any], None], servicer: Any) -> None:
        """Registers ``servicer`` through its generated ``add_*Servicer_to_server``."""
        add(servicer, self)

    def add_generic_rpc_handlers(self, handlers: Sequence[GenericHandler]) -> None:
        """Generated code registers each service twice, as a generic handler and by method name;
        gRPC looks the names up first, so only that copy is kept (wrapped) and this one dropped."""

    def add_registered_method_handlers(self, service: str, handlers: Mapping[str, Handler]) -> None:
        self._server.add_registered_method_handlers(  # type: ignore[attr-defined]  # stubs predate it
            service,
            {
                name: with_steps(self._steps, handler, f"/{service}/{name}")
                for name, handler in handlers.items()
            },
        )

    def answer_unknown_methods(self) -> None:
        """Answers every method not registered UNIMPLEMENTED, through the steps (register the
        servicers first: gRPC asks this handler only for names it has not found)."""
        self._server.add_generic_rpc_handlers([_UnknownMethods(self._steps)])


class _UnknownMethods(GenericHandler):
    """Answers unknown methods without reading a request.

    The steps wrap unary handlers, but gRPC runs a unary handler only once a request message
    has arrived: a streaming caller that sends none first (or half-closes at once) would wait
    for its deadline, or for ever, where gRPC itself answers UNIMPLEMENTED at once. So the
    stepped unary refusal runs inside a bidirectional handler, which gRPC starts at once.
    """

    def __init__(self, steps: Sequence[Step]) -> None:
        self._steps = steps
        self._unimplemented = grpc.unary_unary_rpc_method_handler(_unimplemented)

    def service(self, details: grpc.HandlerCallDetails) -> Handler:
        # Made per call: only calls to unknown methods come here.
        stepped = with_steps(self._steps, self._unimplemented, details.method)
        refuse = cast(Behaviour, stepped.unary_unary)

        async def answer(requests: Any, context: Context) -> None:
            await refuse(b"", context)  # aborts, with the steps' status or UNIMPLEMENTED

        return grpc.stream_stream_rpc_method_handler(answer)


async def _unimplemented(request: Any, context: Context) -> Any:
    await context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        "no such method on this server; server reflection lists the methods it serves",
    )
