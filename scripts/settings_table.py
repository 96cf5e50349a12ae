"""Prints the README's settings table from the Settings class."""

from pydantic import BaseModel

from knn_classifier.server.settings import Settings


def rows(model: type[BaseModel], prefix: str) -> list[str]:
    lines = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        variable = f"{prefix}{name.upper()}"
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            lines.extend(rows(annotation, f"{variable}__"))
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, list):
            shown = ",".join(map(str, default))
        elif hasattr(default, "get_secret_value"):
            shown = "(secret)"
        else:
            shown = str(default).replace("\n", "\\n")
        lines.append(f"| `{variable}` | `{shown}` | {field.description} |")
    return lines


if __name__ == "__main__":
    print("| variable | default | meaning |\n|---|---|---|")
    print("\n".join(rows(Settings, "KNN_")))
