"""docker-compose.yml cannot run here (no Docker engine): check what reading it can check."""

from __future__ import annotations

import importlib.metadata
import json
import re
import threading
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

from knn_classifier.client import NotFoundError
from knn_classifier.server.errors import StartupError
from knn_classifier.server.settings import Settings
from knn_classifier.server.store.compatibility import major_minor

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture
def server_with_metrics(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[int]:
    """The metrics port of a real server that has served a few calls (so every series exists)."""
    settings = make_settings(
        tmp_path / "data",
        fake_embedder.base_url,
        metrics={"enabled": True, "port": 0},
        embedding={"cache_entries": 10, "cache_file": True},
    )
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("c")
            fake_embedder.reset(fail_status=503, fail_times=1)  # one retry
            client.add_exemplars("c", [("top up my card", "top_up"), ("card lost", "lost")])
            client.classify("c", "top up")
            client.classify("c", "top up", voting="centroid")  # a label-model fit
            client.classify("c", "zebra", min_similarity=0.99)
            with pytest.raises(NotFoundError):
                client.classify("missing", "text")
        assert running.app is not None
        assert running.app.metrics_port is not None
        yield running.app.metrics_port
    finally:
        running.stop()


def container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(mapping).split(":")[-1]) for mapping in service.get("ports", [])}


def setting_exists(variable: str) -> bool:
    path = variable.removeprefix("KNN_").lower().split("__")
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


def test_every_knn_variable_is_a_real_setting_and_valid(compose: dict[str, Any]) -> None:
    environment = compose["services"]["knn-classifier"]["environment"]
    unknown = [name for name in environment if not setting_exists(name)]
    assert unknown == []
    assert not setting_exists("KNN_EMBEDDING__NO_SUCH_THING")  # the check itself can fail


def test_the_environment_parses_into_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in compose["services"]["knn-classifier"]["environment"].items():
        monkeypatch.setenv(name, str(value))
    settings = Settings()
    assert settings.store.url == "http://qdrant:6333"
    assert settings.dimensions == [256, 1024, 2560]


def test_ports_agree(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["knn-classifier"]["environment"]
    assert int(env["KNN_SERVER__PORT"]) in container_ports(services["knn-classifier"])

    embedder = urlparse(env["KNN_EMBEDDING__BASE_URL"])
    sglang = services["sglang"]
    command = sglang["command"]
    assert embedder.hostname == "sglang"
    assert int(command[command.index("--port") + 1]) == embedder.port
    assert embedder.port in container_ports(sglang)
    assert f":{embedder.port}/health" in " ".join(sglang["healthcheck"]["test"])
    assert "--is-embedding" in command

    store = urlparse(env["KNN_STORE__URL"])
    assert store.hostname == "qdrant"
    assert {store.port, int(env["KNN_STORE__GRPC_PORT"])} <= container_ports(services["qdrant"])


def test_the_service_waits_for_healthy_dependencies_and_sglang_gets_a_gpu(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    depends = services["knn-classifier"]["depends_on"]
    assert depends == {
        "sglang": {"condition": "service_healthy"},
        "qdrant": {"condition": "service_healthy"},
    }
    devices = services["sglang"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert any(v.endswith(":/qdrant/storage") for v in services["qdrant"]["volumes"])


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of the service's bind mounts of repository files."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("./"):
            found[target] = ROOT / source
    return found


def test_prometheus_scrapes_every_replica_on_its_metrics_port(compose: dict[str, Any]) -> None:
    services = compose["services"]
    env = services["knn-classifier"]["environment"]
    assert str(env["KNN_METRICS__ENABLED"]).lower() == "true"
    assert env["KNN_METRICS__HOST"] == "0.0.0.0"  # reachable from the prometheus container
    port = int(env["KNN_METRICS__PORT"])
    assert str(port) in services["knn-classifier"]["expose"]

    prometheus = services["prometheus"]
    command = prometheus["command"]
    (config_flag,) = [c for c in command if c.startswith("--config.file=")]
    config_path = mounts(prometheus)[config_flag.split("=", 1)[1]]
    config = yaml.safe_load(config_path.read_text())
    (job,) = config["scrape_configs"]
    (discovery,) = job["dns_sd_configs"]
    # Docker's DNS answers the service name with every replica's address.
    assert discovery["names"] == ["knn-classifier"]
    assert discovery["type"] == "A"
    assert discovery["port"] == port
    assert job["job_name"] == "knn-classifier"


def grafana_files(compose: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], Path]:
    grafana = compose["services"]["grafana"]
    found = mounts(grafana)
    provisioning = found["/etc/grafana/provisioning"]
    (datasource,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "knn-classifier.yml").read_text())[
        "providers"
    ]
    dashboards = found[provider["options"]["path"]]
    return datasource, provider, dashboards / "knn-classifier.json"


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    compose: dict[str, Any],
) -> None:
    datasource, _, dashboard_file = grafana_files(compose)
    prometheus_port = container_ports(compose["services"]["prometheus"])
    assert urlparse(datasource["url"]).hostname == "prometheus"
    assert urlparse(datasource["url"]).port in prometheus_port
    dashboard = json.loads(dashboard_file.read_text())
    used = {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert used == {datasource["uid"]}


def test_the_dashboard_charts_every_service_metric_and_only_real_ones(
    compose: dict[str, Any], server_with_metrics: int
) -> None:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{server_with_metrics}/metrics", timeout=30
    ) as response:
        families = list(text_string_to_metric_families(response.read().decode()))
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    exported = {
        family.name + suffix for family in families for suffix in suffixes.get(family.type, [""])
    }
    labels = {"le", "instance", "job"} | {
        label for family in families for sample in family.samples for label in sample.labels
    }
    _, _, dashboard_file = grafana_files(compose)
    dashboard = json.loads(dashboard_file.read_text())
    queries = [
        target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])
    ]
    queries.append(dashboard["templating"]["list"][0]["query"]["query"])
    expressions = [re.sub(r'"[^"]*"', '""', query) for query in queries]  # without label values
    named = {
        name
        for expr in expressions
        for name in re.findall(r"\b(?:knn|grpc_server|process)_[a-z_]+\b", expr)
    }
    assert named - exported == set()  # no panel queries a metric the service does not export
    service_families = {
        f.name
        for f in families
        if f.name.startswith(("knn_", "grpc_server_")) and not f.name.endswith("_created")
    }
    charted = {f for f in service_families if any(n.startswith(f) for n in named)}
    assert charted == service_families  # every metric of the service has a panel
    grouped = {
        label.strip()
        for expr in expressions
        for group in re.findall(r"by \(([^)]*)\)", expr)
        for label in group.split(",")
    }
    assert grouped - labels == set()


def test_the_qdrant_image_has_the_minor_version_of_the_installed_qdrant_client(
    compose: dict[str, Any],
) -> None:
    image = compose["services"]["qdrant"]["image"]
    name, tag = image.rsplit(":", 1)
    assert name == "qdrant/qdrant"
    assert major_minor(tag) == major_minor(importlib.metadata.version("qdrant-client"))


@pytest.fixture
def old_qdrant() -> Iterator[str]:
    """An HTTP server that answers Qdrant's version endpoint as Qdrant 1.16.3 does."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"title": "qdrant - vector search engine", "version": "1.16.3"})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()


async def test_the_server_store_refuses_to_open_on_a_qdrant_the_client_does_not_support(
    old_qdrant: str,
) -> None:
    from qdrant_client import AsyncQdrantClient

    from knn_classifier.server.store.qdrant_server import QdrantServerStore

    store = QdrantServerStore(AsyncQdrantClient(url=old_qdrant, check_compatibility=False), "knn")
    with pytest.raises(StartupError, match=r"version 1\.16\.3.*run Qdrant v1\.20\.x"):
        await store.open([8])
    await store.close()
