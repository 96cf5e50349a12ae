"""Client and AsyncClient offer the same methods with the same parameters: a method added to one
and forgotten in the other, or a parameter spelt or defaulted differently, fails here."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Iterator

from knn_classifier.client import AsyncClient, Client

# The context-manager protocol differs by nature (with / async with); everything else matches.
_PROTOCOL = {"__enter__", "__exit__", "__aenter__", "__aexit__"}
_ASYNC_KINDS = (inspect.iscoroutinefunction, inspect.isasyncgenfunction)


def _methods(cls: type) -> dict[str, Callable[..., object]]:
    return {
        name: member
        for name, member in vars(cls).items()
        if callable(member)
        and (not name.startswith("_") or name == "__init__")
        and name not in _PROTOCOL
    }


def _differences(blocking: type, asynchronous: type) -> list[str]:
    """What differs between the public methods of the two classes, in words."""
    found: list[str] = []
    sync_methods, async_methods = _methods(blocking), _methods(asynchronous)
    for name in sorted(sync_methods.keys() ^ async_methods.keys()):
        side = blocking if name in sync_methods else asynchronous
        found.append(f"{name} only in {side.__name__}")
    for name in sorted(sync_methods.keys() & async_methods.keys()):
        sync_method, async_method = sync_methods[name], async_methods[name]
        if name != "__init__" and not any(kind(async_method) for kind in _ASYNC_KINDS):
            found.append(f"{asynchronous.__name__}.{name} is not async")
        if any(kind(sync_method) for kind in _ASYNC_KINDS):
            found.append(f"{blocking.__name__}.{name} is async")
        sync_params = _parameters(sync_method)
        async_params = _parameters(async_method)
        if sync_params != async_params:
            found.append(f"{name}: {sync_params} != {async_params}")
    return found


def _parameters(method: Callable[..., object]) -> list[tuple[str, str, object, str]]:
    """Name, kind, default and annotation of each parameter; channel types differ by nature."""
    return [
        (p.name, p.kind.name, p.default, str(p.annotation).replace("grpc.aio.", "grpc."))
        for p in inspect.signature(method).parameters.values()
    ]


def test_client_and_async_client_have_the_same_methods_and_parameters() -> None:
    assert _differences(Client, AsyncClient) == []


def test_the_check_finds_each_kind_of_difference() -> None:
    class Blocking:
        def __init__(self, target: str = "a") -> None: ...
        def only_here(self) -> None: ...
        def renamed(self, name: str) -> None: ...
        def defaulted(self, *, k: int = 1) -> None: ...
        def keyword(self, k: int) -> None: ...
        def blocking(self) -> None: ...
        def pages(self) -> Iterator[int]:
            yield 1

    class Asynchronous:
        def __init__(self, target: str = "b") -> None: ...
        async def renamed(self, label: str) -> None: ...
        async def defaulted(self, *, k: int = 2) -> None: ...
        async def keyword(self, *, k: int) -> None: ...
        def blocking(self) -> None: ...
        async def pages(self) -> AsyncIterator[int]:
            yield 1

    found = _differences(Blocking, Asynchronous)
    assert found[0] == "only_here only in Blocking"
    assert [line.split(":")[0] for line in found[1:]] == [
        "__init__",
        "Asynchronous.blocking is not async",
        "defaulted",
        "keyword",
        "renamed",
    ]
