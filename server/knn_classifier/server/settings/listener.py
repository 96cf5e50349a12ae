"""Settings of the gRPC listener and of who may call it: address, API keys, TLS
(``KNN_SERVER__*``, ``KNN_AUTH__*``, ``KNN_TLS__*``)."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import NoDecode


class ServerSettings(BaseModel):
    """The gRPC listener."""

    host: str = Field(
        "127.0.0.1",
        description="Address to listen on: a name, an IPv4 address, or an IPv6 address with or "
        "without brackets (::1, [::1]).",
    )
    port: int = Field(50051, ge=0, le=65535, description="Port to listen on (0: any free port).")
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long in-flight calls may take to finish."
    )
    health_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often health checks the embedder and the store (NOT_SERVING if down).",
    )
    trusted_proxy: bool = Field(
        False,
        description=(
            "Allow listening beyond loopback without API keys, because a trusted proxy in "
            "front authenticates callers."
        ),
    )

    @field_validator("host")
    @classmethod
    def _unbracket_ipv6(cls, value: str) -> str:
        """Keeps an IPv6 address bare (``::1``); :attr:`address` adds the brackets gRPC needs."""
        if value.startswith("[") and value.endswith("]"):
            try:
                return str(ipaddress.IPv6Address(value[1:-1]))
            except ValueError:
                raise ValueError(f"{value} is not an IPv6 address in brackets") from None
        return value

    @property
    def address(self) -> str:
        """The address to bind, as gRPC takes it."""
        return host_port(self.host, self.port)


class AuthSettings(BaseModel):
    """API keys. With none, the service listens on loopback only (see server.trusted_proxy)."""

    read_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Keys that may classify and list (comma-separated)."
    )
    write_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Keys that may do everything (comma-separated)."
    )
    keys_file: Path | None = Field(
        None, description="File of '<sha256 hex of key> read|write' lines, read at start."
    )

    @field_validator("read_keys", "write_keys", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @property
    def enabled(self) -> bool:
        return bool(self.read_keys or self.write_keys or self.keys_file)


class TlsSettings(BaseModel):
    """TLS for the gRPC listener; off unless cert_file and key_file are set."""

    cert_file: Path | None = Field(None, description="PEM server certificate chain.")
    key_file: Path | None = Field(None, description="PEM private key of the certificate.")
    client_ca_file: Path | None = Field(
        None, description="PEM CA bundle; if set, clients must present a certificate it signed."
    )

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both tls.cert_file and tls.key_file, or neither")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("tls.client_ca_file needs tls.cert_file and tls.key_file")
        return self


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address) only reaches this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port`` as gRPC takes it, with an IPv6 address in brackets (``[::1]:50051``)."""
    try:
        ipv6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        ipv6 = False
    return f"[{host}]:{port}" if ipv6 else f"{host}:{port}"
