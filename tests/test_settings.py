from pathlib import Path

import pytest
from pydantic import ValidationError

from knn_classifier.server.settings import Settings


def test_defaults_target_sglang_and_qwen3() -> None:
    s = Settings()
    assert s.embedding.base_url == "http://localhost:30000/v1"
    assert s.embedding.model == "Qwen/Qwen3-Embedding-4B"
    assert s.embedding.template == "Instruct: {instruction}\nQuery:{text}"
    assert s.dimensions == [256, 1024, 2560]
    assert s.store.url is None


def test_environment_with_nested_sections(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNN_DIMENSIONS", "1024, 256")
    monkeypatch.setenv("KNN_EMBEDDING__BASE_URL", "http://sglang:30000/v1")
    monkeypatch.setenv("KNN_STORE__URL", "http://qdrant:6333")
    monkeypatch.setenv("KNN_SERVER__PORT", "6000")
    monkeypatch.setenv("KNN_DATA_DIR", "/var/knn")
    s = Settings()
    assert s.dimensions == [256, 1024]
    assert s.embedding.base_url == "http://sglang:30000/v1"
    assert s.store.url == "http://qdrant:6333"
    assert s.server.port == 6000
    assert s.data_dir == Path("/var/knn")


def test_dimensions_as_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KNN_DIMENSIONS", "[384]")
    assert Settings().dimensions == [384]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dimensions": []}, "at least one dimension"),
        ({"dimensions": [256, 256]}, "must not repeat"),
        ({"dimensions": [0]}, "positive"),
        ({"embedding": {"template": "Query: {query}"}}, "must contain {text}"),
        ({"embedding": {"template": "{text} {lang}"}}, "unknown template fields"),
        ({"defaults": {"k": 500}}, "exceeds limits.max_k"),
        ({"defaults": {"voting": "plurality"}}, "voting"),
        ({"nonsense": 1}, "nonsense"),
    ],
)
def test_invalid_settings_say_what_is_wrong(values: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**values)  # type: ignore[arg-type]


def test_every_field_is_documented() -> None:
    def fields(model: type) -> list[tuple[str, object]]:
        found = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            found.append((name, info.description))
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                found.extend(fields(annotation))
        return found

    undocumented = [name for name, description in fields(Settings) if not description]
    assert undocumented == []


def test_the_readme_lists_every_setting() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()

    def names(model: type, prefix: str) -> list[str]:
        found = []
        for name, info in model.model_fields.items():  # type: ignore[attr-defined]
            annotation = info.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                found.extend(names(annotation, f"{prefix}{name.upper()}__"))
            else:
                found.append(f"{prefix}{name.upper()}")
        return found

    missing = [name for name in names(Settings, "KNN_") if f"| `{name}` |" not in readme]
    assert missing == []
