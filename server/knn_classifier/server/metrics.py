"""Prometheus metrics: every instrument of the service, in one registry per App.

A registry per App (not prometheus_client's global one) lets several servers live in one process,
as in the tests. Label values are bounded: methods come from the registered handlers, codes from
``grpc.StatusCode``, outcomes and reasons from fixed sets, and classifier names beyond the first
``max_classifiers`` seen are counted together as ``other``; a deleted classifier's series are
removed and its place freed for another name. Nothing is labelled per text or id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar, cast
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

OTHER = "other"
"""The classifier label of every classifier beyond the first ``max_classifiers``."""

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_POWERS_OF_TWO = tuple(float(2**i) for i in range(13))  # 1 .. 4096
_SHARES = tuple(round(0.1 * i, 1) for i in range(1, 11))  # 0.1 .. 1.0
# Cosine similarities bunch up differently per model (e5: 0.7-0.95; Qwen3: 0.3-0.8), so the
# drift histogram needs a fine grid over the whole range.
_SIMILARITIES = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0 .. 1.0
_SCRAPE_TIMEOUT_S = 5.0

Instrument = TypeVar("Instrument", Counter, Histogram)

ExemplarCounts = Callable[[], Coroutine[Any, Any, list[tuple[str, int]]]]


class ClassifierLabels:
    """Classifier name -> metric label: itself for the first ``limit`` names seen, else 'other'.

    Thread-safe: the event loop and the scrape thread both ask.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._named: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, name: str) -> str:
        if name in self._named:
            return name
        with self._lock:
            if len(self._named) < self._limit:
                self._named.add(name)
                return name
        return OTHER

    def forget(self, name: str) -> bool:
        """Frees ``name``'s place for another name; whether it had one (it was not 'other')."""
        with self._lock:
            if name in self._named:
                self._named.remove(name)
                return True
        return False


class Metrics:
    """The service's instruments; components record into them, the App serves them."""

    def __init__(self, max_classifiers: int = 50) -> None:
        self.registry = CollectorRegistry()
        self.classifier = ClassifierLabels(max_classifiers)
        registry = self.registry
        rpc = ["grpc_service", "grpc_method", "grpc_code"]
        self.rpcs = Counter(
            "grpc_server_handled",
            "RPCs completed, by method and status code.",
            rpc,
            registry=registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "RPC latency in the server, by method and status.",
            rpc,
            buckets=_SECONDS,
            registry=registry,
        )
        self.embedding_calls = Counter(
            "knn_embedding_calls",
            "HTTP calls to the embedding server, by outcome "
            "(ok, http_<status>, unreachable, cancelled).",
            ["outcome"],
            registry=registry,
        )
        self.embedding_call_seconds = Histogram(
            "knn_embedding_call_seconds",
            "Latency of one HTTP call to the embedding server.",
            buckets=_SECONDS,
            registry=registry,
        )
        self.embedding_texts_per_call = Histogram(
            "knn_embedding_texts_per_call",
            "Texts sent in one embedding call.",
            buckets=_POWERS_OF_TWO,
            registry=registry,
        )
        self.embedding_retries = Counter(
            "knn_embedding_retries",
            "Embedding calls retried, by the failure that caused it.",
            ["reason"],
            registry=registry,
        )
        self.embedding_queued_texts = Gauge(
            "knn_embedding_queued_texts",
            "Classify texts waiting for an embedding call.",
            registry=registry,
        )
        self.embedding_requests_per_call = Histogram(
            "knn_embedding_requests_per_call",
            "Classify requests sharing one embedding call (the coalescing ratio).",
            buckets=_POWERS_OF_TWO[:9],
            registry=registry,
        )
        self.cache_lookups = Counter(
            "knn_embedding_cache_lookups",
            "Embedding cache lookups, by layer (memory, sqlite, redis) and result (hit, miss).",
            ["layer", "result"],
            registry=registry,
        )
        self.store_query_seconds = Histogram(
            "knn_store_query_seconds",
            "Latency of one (batched) neighbour query to the store.",
            ["dimension"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.model_fit_seconds = Histogram(
            "knn_model_fit_seconds",
            "Time to fit a model derived from a classifier's exemplars (a label model), by kind; "
            "a fit happens at the first use after a write, so its count is the refits.",
            ["kind"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.predictions = Counter(
            "knn_predictions",
            "Classified texts, by classifier and outcome (label, an unknown "
            "reason such as below_min_similarity, or rejected).",
            ["classifier", "outcome"],
            registry=registry,
        )
        self.confidence = Histogram(
            "knn_prediction_confidence",
            "Confidence of predictions (unknowns included).",
            ["classifier"],
            buckets=_SHARES,
            registry=registry,
        )
        self.top_similarity = Histogram(
            "knn_prediction_top_similarity",
            "Similarity of the nearest exemplar; a falling "
            "distribution means traffic drifts away from the exemplars.",
            ["classifier"],
            buckets=_SIMILARITIES,
            registry=registry,
        )
        ProcessCollector(registry=registry)
        self._rpc_children: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._series: dict[tuple[int, tuple[str, ...]], Any] = {}

    def series(self, metric: Instrument, *labels: str) -> Instrument:
        """``metric.labels(*labels)``, looked up once: a lookup validates the values and takes
        a lock, and the service records per call. From any thread: at worst two threads both
        look up the same series, which prometheus_client gives them once."""
        key = (id(metric), labels)
        child = self._series.get(key)
        if child is None:
            child = self._series[key] = metric.labels(*labels)
        return cast(Instrument, child)

    def count_rpc(self, service: str, method: str, code: str, seconds: float) -> None:
        """Counts one finished RPC and its latency (label lookups cached: this runs per call)."""
        key = (service, method, code)
        children = self._rpc_children.get(key)
        if children is None:
            children = self.rpcs.labels(*key), self.rpc_seconds.labels(*key)
            self._rpc_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def forget_classifier(self, name: str) -> None:
        """Removes the series of a deleted classifier, so the names of deleted classifiers do
        not accumulate (one folded into 'other' stays counted there)."""
        if self.classifier.forget(name):
            for metric in (self.predictions, self.confidence, self.top_similarity):
                metric.remove_by_labels({"classifier": name})
                for key in [k for k in list(self._series) if k[0] == id(metric)]:
                    if key[1][0] == name:
                        self._series.pop(key, None)

    @contextmanager
    def embedding_call(self, texts: int) -> Iterator[None]:
        """Times one HTTP call of ``texts`` texts and counts it by outcome."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        except Exception as exc:
            status = getattr(exc, "status_code", None)
            outcome = f"http_{status}" if isinstance(status, int) else "unreachable"
            raise
        finally:
            self.embedding_call_seconds.observe(time.perf_counter() - started)
            self.embedding_texts_per_call.observe(texts)
            self.embedding_calls.labels(outcome).inc()

    def watch_exemplars(self, loop: asyncio.AbstractEventLoop, counts: ExemplarCounts) -> None:
        """Reports ``knn_exemplars`` per classifier at each scrape, counted on ``loop``."""
        self.registry.register(_ExemplarCollector(loop, counts, self.classifier))

    def serve(self, host: str, port: int) -> MetricsServer:
        """Serves /metrics on ``host:port`` in a background thread."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        return MetricsServer(server, thread)


class MetricsServer:
    """The running HTTP listener of the metrics."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _ExemplarCollector(Collector):
    """``knn_exemplars``: counted from the store at scrape time, so it includes the writes of
    other replicas, and a scrape never sees a stale number."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        counts: ExemplarCounts,
        label: Callable[[str], str],
    ) -> None:
        self._loop = loop
        self._counts = counts
        self._label = label

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        if self._loop.is_closed():
            return [family]
        future = asyncio.run_coroutine_threadsafe(self._counts(), self._loop)
        try:
            counts = future.result(timeout=_SCRAPE_TIMEOUT_S)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            future.cancel()
            log.warning("exemplar counts took over %gs; left out of this scrape", _SCRAPE_TIMEOUT_S)
            return [family]
        except Exception as exc:
            log.warning("exemplar counts failed (%s); left out of this scrape", exc)
            return [family]
        totals: dict[str, int] = {}
        for name, count in counts:
            label = self._label(name)
            totals[label] = totals.get(label, 0) + count
        for label, total in totals.items():
            family.add_metric([label], total)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "knn_exemplars", "Exemplars held, by classifier.", labels=["classifier"]
        )
