"""Assembles the running service: store, embedder, core, gRPC server, health and reflection."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]  # stubs predate aio
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

from knn_classifier.v1 import classifier_pb2, classifier_pb2_grpc

from .admission import LimitConcurrentCalls
from .api import ClassifierServicer
from .auth import ApiKeyCheck
from .cache import CachedEmbeddings, EmbeddingCache, persistent_backend
from .coalescing import Coalescer
from .embedding import EmbeddingClient
from .embedding_pipeline import EmbeddingPipeline, TracedEmbeddings
from .errors import StartupError
from .interception import Registration, Step
from .metrics import Metrics, MetricsServer
from .parsing import RejectMalformedRequests
from .service import ClassifierService
from .settings import Settings, host_port
from .startup import StartingGate, key_ring, listen, tls_credentials
from .store import EdgeStore, Store
from .telemetry import RpcTelemetry
from .tracing import otlp_provider
from .vectors import Embeds

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["ClassifierService"].full_name


def build_store(settings: Settings) -> Store:
    """The Qdrant server store if ``store.url`` is set, else the embedded store in data_dir."""
    if settings.store.url:
        from qdrant_client import AsyncQdrantClient

        from .store.qdrant_server import ClusterLayout, QdrantServerStore

        client = AsyncQdrantClient(
            url=settings.store.url,
            grpc_port=settings.store.grpc_port,
            prefer_grpc=True,
            api_key=settings.store.api_key.get_secret_value() if settings.store.api_key else None,
            timeout=settings.store.timeout_s,
            # The store checks the server's version when it opens (store/compatibility.py) and
            # refuses to start on a mismatch; the client's own check would only warn, from a
            # background thread, and once more if Qdrant is not up yet.
            check_compatibility=False,
        )
        return QdrantServerStore(
            client,
            settings.store.collection_prefix,
            settings.store.quantize_from_dimension,
            ClusterLayout(
                settings.store.shard_number,
                settings.store.replication_factor,
                settings.store.write_consistency_factor,
            ),
        )
    return EdgeStore(settings.data_dir, settings.store.min_free_bytes)


def build_cache(settings: Settings, metrics: Metrics | None = None) -> EmbeddingCache | None:
    """The embedding cache the settings ask for, or None."""
    embedding = settings.embedding
    path = settings.data_dir / "embedding-cache.sqlite" if embedding.cache_file else None
    backend = persistent_backend(embedding.cache_redis_url, path, embedding.cache_file_entries)
    if embedding.cache_entries == 0 and backend is None:
        return None
    return EmbeddingCache(backend, embedding.cache_entries, metrics)


def build_embedding(settings: Settings, metrics: Metrics | None = None) -> EmbeddingPipeline:
    """The embedding layers: Classify through cache, coalescer and client; the bulk path
    through cache and client (see embedding_pipeline)."""
    client = EmbeddingClient(settings.embedding, metrics)
    coalescer = Coalescer(
        client,
        settings.embedding.max_texts_per_call,
        settings.embedding.max_concurrent_calls,
        settings.limits.max_queued_texts,
        settings.embedding.max_wait_ms / 1000,
        metrics,
    )
    cache = build_cache(settings, metrics)
    classify: Embeds = coalescer
    bulk: Embeds = client
    if cache is not None:
        classify = CachedEmbeddings(coalescer, cache, client.known_fingerprint)
        bulk = CachedEmbeddings(client, cache, client.known_fingerprint)
    return EmbeddingPipeline(
        client, TracedEmbeddings(classify), TracedEmbeddings(bulk), coalescer, cache
    )


def call_steps(
    settings: Settings,
    metrics: Metrics,
    tracer_provider: TracerProvider | None,
    gate: StartingGate,
) -> list[Step]:
    """The steps of every call (see interception), in call order: telemetry first, to see every
    call (refused ones too), and its inner part last, to see parsed requests."""
    telemetry = RpcTelemetry(metrics, tracer_provider, settings.access_log)
    return [
        telemetry,
        LimitConcurrentCalls(settings.limits.max_concurrent_rpcs),
        *([ApiKeyCheck(key_ring(settings.auth))] if settings.auth.enabled else []),
        gate,
        RejectMalformedRequests(),
        telemetry.inner,
    ]


_FAILED_START_GRACE_S = 1.0


class App:
    """The service and its gRPC server.

    Construction checks the files the settings name (StartupError if one is bad). ``listen``
    binds the port and answers health (NOT_SERVING) and reflection; ``start`` listens if that
    was not done yet, starts the service, and returns the bound port once serving.

    ``tracer_provider`` replaces the one the tracing settings describe (tests pass one with an
    in-memory exporter).
    """

    def __init__(
        self,
        settings: Settings,
        store: Store | None = None,
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.settings = settings
        self._credentials = tls_credentials(settings.tls)
        self.metrics = Metrics(settings.metrics.max_classifiers)
        self._own_tracer_provider = tracer_provider is None
        self.tracer_provider = tracer_provider or otlp_provider(settings.tracing)
        self.service = ClassifierService(
            settings,
            build_embedding(settings, self.metrics),
            store or build_store(settings),
            self.metrics,
        )
        self.health = health_aio.HealthServicer()
        # Requests up to max_request_bytes (a full AddExemplars batch of long texts); responses
        # are kept under max_response_bytes by the service, and this hard cap is only a backstop.
        limit = settings.limits.max_request_bytes
        self._gate = StartingGate(SERVICE_NAME)  # health and reflection answer while starting
        self.server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Without this a second instance on the same port would start and take a share
                # of the calls (gRPC sets SO_REUSEPORT by default).
                ("grpc.so_reuseport", 0),
            ],
        )
        registration = Registration(
            self.server, call_steps(settings, self.metrics, self.tracer_provider, self._gate)
        )
        registration.register(
            classifier_pb2_grpc.add_ClassifierServiceServicer_to_server,
            ClassifierServicer(self.service),
        )
        registration.register(health_pb2_grpc.add_HealthServicer_to_server, self.health)
        registration.register(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(  # type: ignore[attr-defined]  # stubs predate aio
                [SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME]
            ),
        )
        registration.answer_unknown_methods()
        self._watcher: asyncio.Task[None] | None = None
        self._metrics_server: MetricsServer | None = None
        self.port: int | None = None

    async def listen(self) -> int:
        """Binds the port and starts answering: health NOT_SERVING, classifier calls UNAVAILABLE."""
        self.port = listen(self.server, self.settings.server, self._credentials)
        await self._report_health(serving=False)
        await self.server.start()
        log.info("listening on %s; starting", host_port(self.settings.server.host, self.port))
        return self.port

    async def start(self) -> int:
        try:
            port = self.port if self.port is not None else await self.listen()
            await self.service.start()
            self._serve_metrics()
        except BaseException:
            # A short grace lets health checks already accepted finish (with stop(0) grpc cancels
            # them and logs a traceback for each beside the one-line reason start-up failed).
            await self.server.stop(_FAILED_START_GRACE_S)
            await self.service.stop()  # release the embedder's connections and the store's lock
            raise
        self._gate.open()
        await self._report_health(serving=True)
        self._watcher = asyncio.create_task(self._watch_health())
        log.info("serving %s on %s", SERVICE_NAME, host_port(self.settings.server.host, port))
        return port

    @property
    def metrics_port(self) -> int | None:
        """The port serving /metrics, or None if metrics are off."""
        return self._metrics_server.address[1] if self._metrics_server else None

    def _serve_metrics(self) -> None:
        config = self.settings.metrics
        if not config.enabled:
            return
        self.metrics.watch_exemplars(asyncio.get_running_loop(), self.service.exemplar_counts)
        try:
            self._metrics_server = self.metrics.serve(config.host, config.port)
        except OSError as exc:
            raise StartupError(
                f"cannot serve metrics on {config.host}:{config.port} ({exc.strerror}); set "
                "KNN_METRICS__PORT to a free port"
            ) from exc
        log.info("metrics on http://%s:%d/metrics", *self._metrics_server.address)

    async def _report_health(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _watch_health(self) -> None:
        """Turns health NOT_SERVING while the embedder or the store is down, SERVING after."""
        serving = True
        while True:
            await asyncio.sleep(self.settings.server.health_interval_s)
            now = await self.service.healthy()
            if now != serving:
                log.warning(
                    "health: %s", "SERVING" if now else "NOT_SERVING (a dependency is down)"
                )
                await self._report_health(now)
                serving = now

    async def stop(self, grace: float | None = None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish within ``grace``, then closes."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.settings.server.grace_period_s if grace is None else grace)
        if self._metrics_server is not None:
            self._metrics_server.close()
        await self.service.stop()
        if self.tracer_provider is not None and self._own_tracer_provider:
            self.tracer_provider.shutdown()  # exports the spans still queued
        log.info("stopped")
