"""docker-compose.yml cannot run here (no Docker engine): check what reading it can check."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml
from pydantic import BaseModel

from knn_classifier.server.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


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
