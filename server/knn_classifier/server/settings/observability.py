"""Settings of Prometheus metrics and OpenTelemetry tracing (``KNN_METRICS__*``,
``KNN_TRACING__*``)."""

from __future__ import annotations

from pydantic import BaseModel, Field


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
