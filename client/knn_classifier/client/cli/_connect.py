"""Where and how the CLI connects: flags, else environment variables, else localhost.

- ``--target`` / ``KNN_TARGET``: host:port of the service (default localhost:50051).
- ``--api-key`` / ``KNN_API_KEY``: sent as ``authorization: Bearer <key>``; prefer the
  variable, since flags show in ``ps``.
- ``--tls`` / ``KNN_USE_TLS=1``: TLS with the system's CA certificates.
- ``--ca-file`` / ``KNN_CA_FILE``: PEM CA that signed the server's certificate (implies TLS).
- ``--cert-file``, ``--key-file`` / ``KNN_CLIENT_CERT_FILE``, ``KNN_CLIENT_KEY_FILE``: the
  client's certificate chain and key, for mutual TLS (imply TLS).
- ``--timeout`` / ``KNN_TIMEOUT``: deadline of each call in seconds (default 300: a batch of
  exemplars for a CPU model on a busy machine takes long).

These names stay clear of the server's settings (``KNN_TLS__*``, ``KNN_AUTH__*``), so one shell
can hold both.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

from .._client import Client, Tls
from ._errors import CliError

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 300.0


def add_arguments(parser: argparse.ArgumentParser, default: object = None) -> None:
    """The connection flags; on a command's parser with ``default=argparse.SUPPRESS``, so that
    they may also follow the command without hiding the ones given before it."""
    group = parser.add_argument_group("connection (flags override the environment)")
    group.add_argument(
        "--target",
        default=default,
        help=f"host:port of the service (KNN_TARGET; default {DEFAULT_TARGET})",
    )
    group.add_argument(
        "--api-key", default=default, help="API key (KNN_API_KEY, preferred: flags show in ps)"
    )
    group.add_argument(
        "--tls",
        action="store_true",
        default=default,
        help="TLS with the system's CA certificates (KNN_USE_TLS=1)",
    )
    group.add_argument(
        "--ca-file",
        default=default,
        help="PEM CA of the server's certificate; implies TLS (KNN_CA_FILE)",
    )
    group.add_argument(
        "--cert-file", default=default, help="PEM client certificate chain (KNN_CLIENT_CERT_FILE)"
    )
    group.add_argument(
        "--key-file", default=default, help="PEM client private key (KNN_CLIENT_KEY_FILE)"
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=default,
        help=f"deadline of each call in seconds (KNN_TIMEOUT; default {DEFAULT_TIMEOUT_S:g})",
    )


def _setting(given: str | None, variable: str) -> str | None:
    return given if given is not None else (os.environ.get(variable) or None)


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise CliError(f"cannot read the {what} {path!r}: {error.strerror}") from None


def client(args: argparse.Namespace) -> Client:
    """A Client as the flags and environment say."""
    ca = _setting(args.ca_file, "KNN_CA_FILE")
    cert = _setting(args.cert_file, "KNN_CLIENT_CERT_FILE")
    key = _setting(args.key_file, "KNN_CLIENT_KEY_FILE")
    use_tls = args.tls or os.environ.get("KNN_USE_TLS", "") in ("1", "true", "yes")
    tls = None
    if use_tls or ca or cert or key:
        tls = Tls(
            root_certificates=_read(ca, "CA file"),
            private_key=_read(key, "client key file"),
            certificate_chain=_read(cert, "client certificate file"),
        )
    timeout = args.timeout if args.timeout is not None else os.environ.get("KNN_TIMEOUT")
    try:
        deadline = float(timeout) if timeout is not None else DEFAULT_TIMEOUT_S
    except ValueError:
        raise CliError(f"KNN_TIMEOUT={timeout!r} is not a number of seconds") from None
    if not 0 < deadline < math.inf:  # gRPC fails every call at once on nan, inf, 0 or less
        raise CliError(
            f"the timeout {deadline:g} is not a positive number of seconds; set --timeout or "
            f"KNN_TIMEOUT to one (default {DEFAULT_TIMEOUT_S:g})"
        )
    return Client(
        _setting(args.target, "KNN_TARGET") or DEFAULT_TARGET,
        api_key=_setting(args.api_key, "KNN_API_KEY"),
        tls=tls,
        timeout=deadline,
    )
