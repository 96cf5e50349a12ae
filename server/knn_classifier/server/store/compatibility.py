"""Whether the Qdrant server speaks the API of the installed qdrant-client.

qdrant-client supports servers of its own major version within one minor version either way;
outside that range requests fail in ways that look like data errors. qdrant-client's own check
only warns, from a background thread, so the server store checks at start-up instead and refuses
to start with a message that says what to change.
"""

from __future__ import annotations

import importlib.metadata
import logging

from ..errors import StartupError

log = logging.getLogger(__name__)


def major_minor(version: str) -> tuple[int, int]:
    """(major, minor) of a version such as ``1.20.0`` or ``v1.20.0-unprivileged``."""
    major, minor, *_ = version.removeprefix("v").split(".")
    return int(major), int(minor)


def check_server_version(server_version: str) -> None:
    """Raises StartupError if qdrant-client cannot talk to a server of ``server_version``; logs a
    warning if it can but the minor versions differ."""
    client_version = importlib.metadata.version("qdrant-client")
    client, server = major_minor(client_version), major_minor(server_version)
    if client[0] != server[0] or abs(client[1] - server[1]) > 1:
        raise StartupError(
            f"the Qdrant server runs version {server_version}, which qdrant-client "
            f"{client_version} does not support (same major version, at most one minor version "
            f"apart); run Qdrant v{client[0]}.{client[1]}.x, as docker-compose.yml does"
        )
    if client != server:
        log.warning(
            "the Qdrant server runs version %s and qdrant-client is %s; run Qdrant v%d.%d.x to "
            "match",
            server_version,
            client_version,
            *client,
        )
