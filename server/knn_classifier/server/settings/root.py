"""The root :class:`Settings`: the top-level variables, the sections, and the checks that
span sections."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from .embedding import EmbeddingSettings
from .limits import ClassifierDefaults, LimitSettings
from .listener import AuthSettings, ServerSettings, TlsSettings, is_loopback
from .observability import MetricsSettings, TracingSettings
from .store import StoreSettings


class Settings(BaseSettings):
    """All settings of the service."""

    model_config = SettingsConfigDict(
        env_prefix="KNN_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    data_dir: Path = Field(
        Path("./data"), description="Directory of the embedded store (one shard per dimension)."
    )
    dimensions: Annotated[list[int], NoDecode] = Field(
        default_factory=lambda: [256, 1024, 2560],
        description=(
            "Matryoshka dimensions kept, one collection each; each at most the model's width. "
            "Classify uses the largest unless a request names another."
        ),
    )
    log_level: str = Field("INFO", description="Python logging level.")
    log_format: Literal["text", "json"] = Field(
        "text",
        description="text: one readable line per record; json: one JSON object per line "
        "(timestamp, level, logger, message and the record's fields).",
    )
    access_log: bool = Field(
        True,
        description="One INFO line per RPC: method, status, duration, classifier, number of "
        "texts, request id and peer (health checks at DEBUG). Never keys or texts.",
    )
    embedding: EmbeddingSettings = Field(
        default_factory=EmbeddingSettings, description="The embedding server (KNN_EMBEDDING__*)."
    )
    store: StoreSettings = Field(
        default_factory=StoreSettings, description="The vector store (KNN_STORE__*)."
    )
    server: ServerSettings = Field(
        default_factory=ServerSettings, description="The gRPC listener (KNN_SERVER__*)."
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys (KNN_AUTH__*).")
    tls: TlsSettings = Field(default_factory=TlsSettings, description="TLS (KNN_TLS__*).")
    limits: LimitSettings = Field(
        default_factory=LimitSettings, description="Request limits (KNN_LIMITS__*)."
    )
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings, description="Prometheus metrics (KNN_METRICS__*)."
    )
    tracing: TracingSettings = Field(
        default_factory=TracingSettings, description="OpenTelemetry tracing (KNN_TRACING__*)."
    )
    defaults: ClassifierDefaults = Field(
        default_factory=ClassifierDefaults,
        description="Defaults of new classifiers (KNN_DEFAULTS__*).",
    )

    @field_validator("dimensions", mode="before")
    @classmethod
    def _parse_dimensions(cls, value: Any) -> Any:
        if isinstance(value, str):
            text = value.strip().strip("[]")
            return [part.strip() for part in text.split(",") if part.strip()]
        return value

    @field_validator("dimensions")
    @classmethod
    def _check_dimensions(cls, value: list[int]) -> list[int]:
        if not value:
            raise ValueError("configure at least one dimension, e.g. KNN_DIMENSIONS=256,1024")
        if any(d < 1 for d in value):
            raise ValueError("dimensions must be positive")
        if len(set(value)) != len(value):
            raise ValueError("dimensions must not repeat")
        return sorted(value)

    @model_validator(mode="after")
    def _refuse_open_listener(self) -> Settings:
        open_to_network = not is_loopback(self.server.host)
        if open_to_network and not self.auth.enabled and not self.server.trusted_proxy:
            raise ValueError(
                f"server.host={self.server.host} is reachable from other machines but no API "
                "keys are set: set KNN_AUTH__WRITE_KEYS (and KNN_AUTH__READ_KEYS) or "
                "KNN_AUTH__KEYS_FILE, or KNN_SERVER__TRUSTED_PROXY=true if a proxy in front "
                "authenticates callers"
            )
        return self

    @model_validator(mode="after")
    def _check_defaults_fit_limits(self) -> Settings:
        if self.defaults.k > self.limits.max_k:
            raise ValueError(
                f"defaults.k={self.defaults.k} exceeds limits.max_k={self.limits.max_k}"
            )
        return self
