"""Errors on the wire: domain errors to gRPC status codes and ``google.rpc.Status`` details.

Every error status carries a ``google.rpc.ErrorInfo`` (domain :data:`DOMAIN`, a reason of the
proto's ``ErrorReason``), plus ``BadRequest`` when fields are at fault, ``ResourceInfo`` when a
resource is named, and ``RetryInfo`` when retrying the same request later can succeed (AIP-193).
The details travel in the ``grpc-status-details-bin`` trailer, where every gRPC library's status
helpers look for them. Trailers are limited (gRPC refuses more than 16 KiB of metadata, and may
refuse more than 8 KiB), so every text in them is clipped to :data:`MAX_TEXT` characters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from . import errors
from .errors import FieldViolation, Reason, Resource

DOMAIN = "knn_classifier.v1"
MAX_TEXT = 500

_CODES: dict[type[errors.ServiceError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Aborted: grpc.StatusCode.ABORTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(error: errors.ServiceError) -> grpc.StatusCode:
    """The status of ``error``'s class or of its nearest ancestor that has one."""
    for kind in type(error).__mro__:
        code = _CODES.get(kind)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def status(
    code: grpc.StatusCode,
    message: str,
    reason: Reason,
    *,
    metadata: Mapping[str, str] | None = None,
    violations: Sequence[FieldViolation] = (),
    resource: Resource | None = None,
    retry_after_s: float | None = None,
) -> status_pb2.Status:
    """A ``google.rpc.Status`` with the details described in the module docstring."""
    message = _clip(message)
    metadata = {key: _clip(value) for key, value in (metadata or {}).items()}
    details: list[Any] = [
        error_details_pb2.ErrorInfo(reason=reason.value, domain=DOMAIN, metadata=metadata)
    ]
    if violations:
        details.append(
            error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(
                        field=_clip(v.field), description=_clip(v.description), reason=reason.value
                    )
                    for v in violations
                ]
            )
        )
    if resource is not None:
        details.append(
            error_details_pb2.ResourceInfo(
                resource_type=resource.type, resource_name=_clip(resource.name)
            )
        )
    if retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after_s * 1e9))
        details.append(error_details_pb2.RetryInfo(retry_delay=delay))
    packed = []
    for detail in details:
        wrapper = any_pb2.Any()
        wrapper.Pack(detail)
        packed.append(wrapper)
    return status_pb2.Status(code=code.value[0], message=message, details=packed)


def _clip(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def of_error(error: errors.ServiceError) -> status_pb2.Status:
    """The status a domain error becomes."""
    return status(
        code_of(error),
        error.message,
        error.reason,
        metadata=error.metadata,
        violations=error.violations,
        resource=error.resource,
        retry_after_s=error.retry_after_s,
    )


INTERNAL = status(
    grpc.StatusCode.INTERNAL, "internal error; see the server log", Reason.INTERNAL_ERROR
)


async def abort(
    context: grpc.aio.ServicerContext[Any, Any], details: status_pb2.Status
) -> NoReturn:
    """Ends the call with ``details``: code, message and the details trailer, beside the
    trailing metadata already set (the request id), which aborting would otherwise replace."""
    wire = rpc_status.to_status(details)
    kept = tuple(context.trailing_metadata() or ())
    await context.abort(wire.code, wire.details, kept + tuple(wire.trailing_metadata))
    raise AssertionError("context.abort returned")  # pragma: no cover
