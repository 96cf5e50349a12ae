"""API keys: a call step that admits only callers presenting a known key.

Keys arrive as ``authorization: Bearer <key>`` metadata. The server keeps SHA-256 digests only
and compares every known digest with :func:`hmac.compare_digest`, so timing reveals nothing about
which key nearly matched. Read keys may classify, list and use reflection; write keys may do
everything. The health service is open to all, so that load balancers need no key.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import grpc

from knn_classifier.v1 import classifier_pb2

from . import statuses
from .errors import Reason
from .interception import Behaviour, Context, Handler, unary
from .settings import AuthSettings

OPEN_PREFIX = "/grpc.health.v1.Health/"
_SERVICE = "/knn_classifier.v1.ClassifierService/"
READ_METHODS = frozenset(
    _SERVICE + name
    for name in (
        "GetClassifier",
        "ListClassifiers",
        "ListExemplars",
        "ListLabels",
        "Classify",
        "ClassifyBatch",
        "GetServiceInfo",
        "CheckExemplars",
    )
) | frozenset(
    # Reflection only describes the API (grpcurl and other tools need it to call anything).
    f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
    for version in ("v1alpha", "v1")
)
WRITE_METHODS = (
    frozenset(
        f"/{service.full_name}/{method.name}"
        for service in classifier_pb2.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    )
    - READ_METHODS
)
"""The API's methods a read key may not call. A read key calling a name outside the API gets
UNIMPLEMENTED, as a write key does, not "needs a write key" for a method that does not exist.
A servicer added to the server must have each method open (OPEN_PREFIX), in READ_METHODS or
here (a test checks every service the server lists), or read keys could call it."""


class Role(enum.StrEnum):
    READ = "read"
    WRITE = "write"


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


@dataclass(frozen=True)
class KeyRing:
    """Digests of the accepted keys and the role of each."""

    entries: tuple[tuple[bytes, Role], ...]

    @classmethod
    def from_settings(cls, settings: AuthSettings) -> KeyRing:
        entries = [(digest(k.get_secret_value()), Role.READ) for k in settings.read_keys]
        entries += [(digest(k.get_secret_value()), Role.WRITE) for k in settings.write_keys]
        if settings.keys_file is not None:
            entries += list(_read_keys_file(settings.keys_file))
        return cls(tuple(entries))

    def role(self, presented: str) -> Role | None:
        """The role of ``presented``, comparing against every key in constant time each."""
        candidate = digest(presented)
        found: Role | None = None
        for known, role in self.entries:
            if hmac.compare_digest(known, candidate):
                found = role
        return found


def _read_keys_file(path: Path) -> Iterable[tuple[bytes, Role]]:
    """Lines of ``<sha256 hex of the key> <read|write>``; '#' starts a comment.

    OSError if the file cannot be read; ValueError naming the line if one is malformed.
    """
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        try:
            hex_digest, role_name = fields
            role, raw = Role(role_name), bytes.fromhex(hex_digest)
        except ValueError:
            raise ValueError(f"line {number}: expected '<sha256 hex> read|write'") from None
        if len(raw) != 32:
            raise ValueError(f"line {number}: not a SHA-256 digest (64 hex digits)")
        yield raw, role


class ApiKeyCheck:
    """The API-key step (see interception): refuses calls without a key of the role the method
    needs, before anything else reads the request."""

    def __init__(self, keys: KeyRing) -> None:
        self._keys = keys
        self._unknown = statuses.status(
            grpc.StatusCode.UNAUTHENTICATED,
            "missing or unknown API key; send 'authorization: Bearer <key>'",
            Reason.API_KEY_INVALID,
        )

    def __call__(self, handler: Handler, method: str) -> Handler:
        if method.startswith(OPEN_PREFIX):
            return handler
        read_only = statuses.status(
            grpc.StatusCode.PERMISSION_DENIED,
            f"this API key is read-only; {method.rsplit('/', 1)[-1]} needs a write key",
            Reason.WRITE_KEY_REQUIRED,
        )
        needs_write = method in WRITE_METHODS

        async def check(context: Context) -> None:
            role = self._role(context)
            if role is None:
                await statuses.abort(context, self._unknown)
            if role is Role.READ and needs_write:
                await statuses.abort(context, read_only)

        if handler.unary_unary is not None:
            behaviour = cast(Behaviour, handler.unary_unary)

            async def checked(request: Any, context: Context) -> Any:
                await check(context)
                return await behaviour(request, context)

            return unary(handler, checked)
        if handler.stream_stream is not None:  # server reflection
            stream = cast(Callable[[Any, Context], AsyncIterator[Any]], handler.stream_stream)

            async def checked_stream(requests: Any, context: Context) -> AsyncIterator[Any]:
                await check(context)
                async for response in stream(requests, context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                checked_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        raise TypeError(f"{method}: API keys are checked on unary and bidirectional methods only")

    def _role(self, context: Context) -> Role | None:
        header = dict(context.invocation_metadata() or ()).get("authorization", "")
        scheme, _, key = str(header).partition(" ")
        return self._keys.role(key) if scheme.lower() == "bearer" and key else None
