"""The module structure docs/design.md's map describes: no import cycles, and a store package
that depends on nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

SERVER = Path(__file__).resolve().parents[1] / "server" / "knn_classifier" / "server"


def module_name(path: Path) -> str:
    parts = path.relative_to(SERVER).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path, modules: set[str]) -> set[str]:
    """The package's modules ``path`` imports at its top level (imports inside functions and
    ``if TYPE_CHECKING`` blocks do not run at import time, so they cannot form a cycle)."""
    name = module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if not isinstance(node, ast.ImportFrom) or node.level == 0:
            continue
        base = package[: len(package) - node.level + 1]
        target = ".".join([*base, *([node.module] if node.module else [])])
        submodules = {f"{target}.{alias.name}".lstrip(".") for alias in node.names} & modules
        # `from . import sweep` inside a package loads the submodule, not the package again.
        for candidate in submodules or {target}:
            if candidate in modules and candidate != name:
                found.add(candidate)
    return found


def graph() -> dict[str, set[str]]:
    paths = sorted(SERVER.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports(path, modules) for path in paths}


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """An import cycle of ``edges`` (module -> modules it imports), or None."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str] | None:
        if module in path:
            return [*path[path.index(module) :], module]
        if module in done:
            return None
        for imported in sorted(edges[module]):
            if found := visit(imported, [*path, module]):
                return found
        done.add(module)
        return None

    for module in sorted(edges):
        if found := visit(module, []):
            return found
    return None


def test_server_modules_import_no_cycle() -> None:
    edges = graph()
    assert len(edges) > 40
    assert cycle(edges) is None, " -> ".join(cycle(edges) or [])


def test_a_planted_cycle_is_found() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_the_store_package_imports_nothing_above_it() -> None:
    allowed = {"errors", "vectors"}
    edges = graph()
    store = {m: deps for m, deps in edges.items() if m == "store" or m.startswith("store.")}
    assert len(store) >= 5
    for module, deps in store.items():
        above = {d for d in deps if not d.startswith("store") and d not in allowed}
        assert not above, f"{module} imports {sorted(above)}"
