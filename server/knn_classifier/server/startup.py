"""What start-up does before the service itself starts: check the files, listen, gate calls.

Every file a setting names is read and checked first, so that a wrong path or a bad key stops
start-up at once with one line naming the setting, before the embedder is waited for or the store
is opened. The port is bound next, so that a port conflict fails fast too and health answers
(NOT_SERVING) while the service starts; classifier calls arriving meanwhile get UNAVAILABLE.
"""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path
from typing import Any, NoReturn, cast

import grpc

from . import statuses
from .auth import KeyRing
from .errors import Reason, StartupError, Unavailable
from .interception import Behaviour, Context, Handler, unary
from .settings import AuthSettings, ServerSettings, TlsSettings


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StartupError(f"{setting}={path}: cannot read it ({exc.strerror})") from None


def tls_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """The listener's TLS credentials, or None without TLS; StartupError if a file is bad."""
    if tls.cert_file is None or tls.key_file is None:
        return None
    cert = _read("KNN_TLS__CERT_FILE", tls.cert_file)
    key = _read("KNN_TLS__KEY_FILE", tls.key_file)
    client_ca = None
    if tls.client_ca_file is not None:
        client_ca = _read("KNN_TLS__CLIENT_CA_FILE", tls.client_ca_file)
        _check_certificates("KNN_TLS__CLIENT_CA_FILE", tls.client_ca_file, client_ca)
    _check_certificates("KNN_TLS__CERT_FILE", tls.cert_file, cert)
    _check_key(tls.cert_file, tls.key_file)
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _check_certificates(setting: str, path: Path, pem: bytes) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii", "replace"))
    except ssl.SSLError:
        raise StartupError(f"{setting}={path}: no PEM certificate in it") from None


class _Encrypted(Exception):
    """The key file asked for a password (gRPC cannot use encrypted keys)."""


def _no_password() -> NoReturn:
    raise _Encrypted


def _check_key(cert: Path, key: Path) -> None:
    """Loads the pair as a TLS server would, naming the key file in what can go wrong."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key, password=_no_password)
    except _Encrypted:
        raise StartupError(
            f"KNN_TLS__KEY_FILE={key}: the key is encrypted; give it unencrypted (PEM)"
        ) from None
    except ssl.SSLError as exc:
        problem = (
            f"not the private key of the certificate in KNN_TLS__CERT_FILE={cert}"
            if exc.reason == "KEY_VALUES_MISMATCH"
            else "no PEM private key in it"
        )
        raise StartupError(f"KNN_TLS__KEY_FILE={key}: {problem}") from None


def key_ring(auth: AuthSettings) -> KeyRing:
    """The API keys; StartupError if the keys file cannot be read or parsed, or gives none."""
    setting = f"KNN_AUTH__KEYS_FILE={auth.keys_file}"
    try:
        keys = KeyRing.from_settings(auth)
    except OSError as exc:
        raise StartupError(f"{setting}: cannot read it ({exc.strerror})") from None
    except ValueError as exc:
        raise StartupError(f"{setting}: {exc}") from None
    if not keys.entries:
        raise StartupError(
            f"{setting}: no keys in it, so every call would be refused; add "
            "'<sha256 hex of the key> read|write' lines"
        )
    return keys


def listen(
    server: grpc.aio.Server, settings: ServerSettings, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds ``settings.address``; returns the port, StartupError if it cannot be bound."""
    try:
        if credentials is None:
            return server.add_insecure_port(settings.address)
        return server.add_secure_port(settings.address, credentials)
    except RuntimeError:
        reason, in_use = _why_not_bindable(settings)
        advice = (
            "another process, perhaps another knn-classifier, listens there: stop it or set "
            "KNN_SERVER__PORT"
            if in_use
            else "check KNN_SERVER__HOST and KNN_SERVER__PORT"
        )
        raise StartupError(f"cannot listen on {settings.address} ({reason}); {advice}") from None


def _why_not_bindable(settings: ServerSettings) -> tuple[str, bool]:
    """The operating system's reason (gRPC's exception does not say), found by binding again,
    and whether it is that the address is in use."""
    try:
        found = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"cannot resolve {settings.host}: {exc.strerror}", False
    for family, kind, protocol, _, address in found:
        with socket.socket(family, kind, protocol) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                probe.bind(address)
            except OSError as exc:
                return str(exc.strerror), exc.errno == errno.EADDRINUSE
    return "gRPC could not bind it", False


class StartingGate:
    """The start-up gate (a call step, see interception): answers calls to ``service``
    UNAVAILABLE until :meth:`open`; other services pass."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"
        self._open = False

    def open(self) -> None:
        self._open = True

    def __call__(self, handler: Handler, method: str) -> Handler:
        if not method.startswith(self._prefix):
            return handler
        if handler.unary_unary is None:
            raise TypeError(f"{method}: the start-up gate guards unary methods only")
        behaviour = cast(Behaviour, handler.unary_unary)

        async def gated(request: Any, context: Context) -> Any:
            if not self._open:
                await _refuse_while_starting(context)
            return await behaviour(request, context)

        return unary(handler, gated)


async def _refuse_while_starting(context: Context) -> None:
    starting = Unavailable(
        "the service is starting (waiting for the embedding server and the store); retry shortly",
        reason=Reason.SERVICE_STARTING,
    )
    await statuses.abort(context, statuses.of_error(starting))
