"""The cache of models derived from exemplars: single flight, failures, leaving callers, bounds."""

from __future__ import annotations

import asyncio

import pytest

from knn_classifier.server.derived import DerivedCache, DerivedKey
from knn_classifier.server.metrics import Metrics


def key(revision: int = 1, classifier: str = "c", uid: str = "u1", kind: str = "m") -> DerivedKey:
    return DerivedKey(classifier, uid, revision, 16, kind)


class Fit:
    """A computation that counts its runs and, while ``gate`` is clear, waits at it."""

    def __init__(self, value: object = "model") -> None:
        self.value = value
        self.runs = 0
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self) -> object:
        self.runs += 1
        self.started.set()
        await self.gate.wait()
        return self.value


async def test_concurrent_callers_share_one_computation_and_later_ones_reuse_it() -> None:
    cache = DerivedCache(8)
    fit = Fit()
    fit.gate.clear()
    callers = [asyncio.create_task(cache.get(key(), fit)) for _ in range(3)]
    await fit.started.wait()
    fit.gate.set()
    assert await asyncio.gather(*callers) == ["model"] * 3
    assert await cache.get(key(), fit) == "model"
    assert fit.runs == 1


async def test_each_fit_is_counted_in_the_metrics_by_kind() -> None:
    metrics = Metrics()
    cache = DerivedCache(8, metrics)
    await cache.get(key(kind="label-model:centroid"), Fit())
    await cache.get(key(kind="label-model:centroid"), Fit())
    await cache.get(key(2, kind="label-model:centroid"), Fit())
    count = metrics.registry.get_sample_value(
        "knn_model_fit_seconds_count", {"kind": "label-model:centroid"}
    )
    assert count == 2


async def test_a_failed_computation_is_not_kept() -> None:
    cache = DerivedCache(8)
    runs = 0

    async def failing() -> object:
        nonlocal runs
        runs += 1
        raise ValueError("did not converge")

    for _ in range(2):
        with pytest.raises(ValueError, match="did not converge"):
            await cache.get(key(), failing)
    assert runs == 2
    assert len(cache) == 0
    assert await cache.get(key(), Fit()) == "model"


async def test_a_caller_that_leaves_does_not_cancel_the_computation_for_others() -> None:
    """Regression: the embedded store's per-copy cache kept a computation cancelled with its
    first caller (a Classify whose deadline passed), and every later Classify of that classifier
    with centroid or discriminant voting failed with CANCELLED until the next write."""
    cache = DerivedCache(8)
    fit = Fit()
    fit.gate.clear()
    leaving = asyncio.create_task(cache.get(key(), fit))
    staying = asyncio.create_task(cache.get(key(), fit))
    await fit.started.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    fit.gate.set()
    assert await staying == "model"
    assert await cache.get(key(), fit) == "model"
    assert fit.runs == 1


async def test_a_computation_whose_only_caller_left_is_finished_and_kept() -> None:
    cache = DerivedCache(8)
    fit = Fit()
    fit.gate.clear()
    leaving = asyncio.create_task(cache.get(key(), fit))
    await fit.started.wait()
    leaving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaving
    fit.gate.set()
    assert await cache.get(key(), fit) == "model"
    assert fit.runs == 1


async def test_the_least_recently_used_model_is_dropped_beyond_the_bound() -> None:
    cache = DerivedCache(2)
    fits = {name: Fit(name) for name in "abc"}
    await cache.get(key(classifier="a"), fits["a"])
    await cache.get(key(classifier="b"), fits["b"])
    await cache.get(key(classifier="a"), fits["a"])  # a is now more recent than b
    await cache.get(key(classifier="c"), fits["c"])
    assert len(cache) == 2
    await cache.get(key(classifier="a"), fits["a"])
    assert fits["a"].runs == 1
    await cache.get(key(classifier="b"), fits["b"])  # dropped: computed again
    assert fits["b"].runs == 2


async def test_a_newer_revision_or_incarnation_replaces_the_older_at_once() -> None:
    cache = DerivedCache(8)
    await cache.get(key(1), Fit("r1"))
    await cache.get(key(1, kind="other"), Fit("other"))
    await cache.get(key(2), Fit("r2"))
    assert len(cache) == 2  # r1 dropped, the other kind kept
    assert await cache.get(key(2), Fit("again")) == "r2"
    assert await cache.get(key(1, uid="u2"), Fit("new incarnation")) == "new incarnation"
    assert await cache.get(key(2), Fit("r2 again")) == "r2 again"  # the old incarnation's dropped


async def test_a_caller_at_an_older_revision_does_not_drop_the_newer_model() -> None:
    """A call that read the record before a write finishes after one that read it after."""
    cache = DerivedCache(8)
    await cache.get(key(3), Fit("r3"))
    assert await cache.get(key(2), Fit("r2")) == "r2"
    newer = Fit("refit")
    assert await cache.get(key(3), newer) == "r3"
    assert newer.runs == 0
