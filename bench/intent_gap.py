"""The many-intent gap (issue 14, part 6): what closes the distance to LogisticRegression.

    python bench/intent_gap.py          # `make bench-intent-gap`; writes nothing, prints tables

The vectors, leave-one-out sample and votes of bench/open_set.py (multilingual-e5-small through
the embedding cache; Evaluate's leave-one-out: a fixed random sample of at most 5,000 exemplars,
exact for the label models; one BLAS thread). Every setting of every method is chosen by
leave-one-out accuracy on the training exemplars only, then measured once on the test set.

Methods measured beside the service's mixture (0.5 x softmax votes + 0.5 x discriminant shares):
- the mixture with a finer weight grid, and mixed geometrically (weighted log shares);
- **ridge**: least-squares one-vs-rest regression of one-hot labels on [x, 1], W = (Z^T Z +
  lambda I)^-1 Z^T Y. Z^T Z and Z^T Y are running sums a write updates exactly (O(D^2)); a
  revision solves once (O(D^3)). Leave-one-out is exact by the hat matrix:
  f_-i(x_i) = (f(x_i) - h_i y_i) / (1 - h_i), h_i = z_i^T (Z^T Z + lambda I)^-1 z_i.
- **ridge on random Fourier features**: the same on z = [x, sqrt(2 / d) cos(x R + b), 1], R with
  N(0, s^2) entries (D columns, seed 0), an approximation of a Gaussian kernel's ridge regression;
- each ridge's shares (softmax at its leave-one-out fitted temperature) alone, mixed with the
  softmax votes, and as a third component beside the votes and the discriminant;
- the discriminant with per-label variance: each label's Mahalanobis distance scaled by the
  label's own mean spread (leave-one-out approximate: the spreads from every exemplar).
Diagnostics: LogisticRegression's own 10-fold cross-validated accuracy on the training texts (the
analogue of the others' leave-one-out), and HWU64 with every text normalised like its test texts
(its test texts are lower case, its training texts are not).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import datetime
import itertools
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.open_set import (
    KNN_GRID,
    NORMALISED,
    DataSet,
    Floats,
    View,
    accuracy,
    label_index,
    label_model_shares,
    load,
    loo_sample,
    loo_view,
    neighbour_shares,
    softmax,
    test_view,
)
from knn_classifier.server import calibration, label_models

SETS = ["hwu64", "banking77", "waimai_10k", "hwu64" + NORMALISED]
COARSE_WEIGHTS = (0.25, 0.5, 0.75)
"""The mixture's neighbour weights bench/open_set.py chose from."""
FINE_WEIGHTS = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2))
THIRDS = tuple(np.round(np.arange(0.0, 1.001, 0.1), 1))
"""The 3-way mixtures' weight grid (each weight a multiple of 0.1, the three summing to 1)."""
LAMBDAS = (0.3, 1.0, 3.0, 10.0)
LINEAR_LAMBDAS = (0.01, 0.1, 1.0)
FEATURES = [(d, s) for d in (1024, 2048) for s in (1.0, 2.0, 4.0)]
"""Random Fourier features: (count, scale of R's entries)."""


@dataclass
class Evaluated:
    """One data set's leave-one-out and test shares of every component considered."""

    data: DataSet
    loo: View
    test: View
    components: dict[str, tuple[Floats, Floats]]
    """name -> (leave-one-out shares, test shares)."""
    costs: dict[str, str]


Pair = tuple[Floats, Floats]
Points = npt.NDArray[np.floating[Any]]
"""Vectors in float32 or float64."""


def components(data: DataSet) -> Evaluated:
    rows = loo_sample(len(data.train))
    loo, test = loo_view(data, rows), test_view(data)
    out: dict[str, Pair] = {}
    for k, t in KNN_GRID:
        out[f"softmax k={k} T={t}"] = (
            neighbour_shares(data, loo, k, t),
            neighbour_shares(data, test, k, t),
        )
    t_d = calibration.fitted_temperature(loo.discriminant, loo.truth, 0.01)
    out["discriminant"] = (
        label_model_shares(loo.discriminant, t_d),
        label_model_shares(test.discriminant, t_d),
    )
    out["discriminant, per-label variance"] = per_label_variance(data, loo, test, rows)
    costs: dict[str, str] = {}
    member = label_index(data.train_labels, data.train_labels)
    for lam in LINEAR_LAMBDAS:
        out[f"ridge lambda={lam}"], costs["ridge"] = ridge(
            data.train, data.test, member, rows, loo.truth, lam
        )
    for count, scale in FEATURES:
        features = random_features(data.train.shape[1], count, scale)
        z_train, z_test = features(data.train), features(data.test)
        for lam in LAMBDAS:
            key = f"ridge, {count} random features s={scale} lambda={lam}"
            out[key], costs[f"ridge, {count}"] = ridge(
                z_train, z_test, member, rows, loo.truth, lam
            )
    return Evaluated(data, loo, test, out, costs)


def random_features(dimension: int, count: int, scale: float) -> Callable[[Points], Floats]:
    rng = np.random.default_rng(0)
    projection = rng.standard_normal((dimension, count)) * scale
    phase = rng.uniform(0, 2 * np.pi, count)

    def features(points: Points) -> Floats:
        x = points.astype(np.float64)
        waves = np.sqrt(2 / dimension) * np.cos(x @ projection + phase)
        return np.hstack([x, waves])

    return features


def ridge(
    train: Points,
    test: Points,
    member: npt.NDArray[np.intp],
    rows: npt.NDArray[np.intp],
    truth: npt.NDArray[np.intp],
    lam: float,
) -> tuple[Pair, str]:
    """The ridge's leave-one-out and test shares (exact hat-matrix leave-one-out), and its cost:
    the solve a revision needs from the running sums, and one write's update of them."""
    z = np.hstack([train.astype(np.float64), np.ones((len(train), 1))])
    z_test = np.hstack([test.astype(np.float64), np.ones((len(test), 1))])
    y = np.zeros((len(z), int(member.max()) + 1))
    y[np.arange(len(z)), member] = 1
    gram, moments = z.T @ z, z.T @ y  # the running sums
    started = time.process_time()
    system = gram + lam * np.eye(len(gram))
    weights = np.linalg.solve(system, moments)
    solve = time.process_time() - started
    started = time.process_time()
    for row in z[:20]:  # 20 writes: both sums updated by one exemplar
        gram += np.outer(row, row)
        moments[:, 0] += row
    write = (time.process_time() - started) / 20
    h = np.einsum("ij,ji->i", z[rows], np.linalg.solve(system, z[rows].T))
    left_out = (z[rows] @ weights - h[:, None] * y[rows]) / (1 - h)[:, None]
    t = calibration.fitted_temperature(left_out, truth, 0.05)
    cost = (
        f"D={len(gram)}: solve {solve:.2f} s CPU per revision, write {1000 * write:.1f} ms CPU, "
        f"sums {gram.nbytes / 2**20:.0f} MiB"
    )
    return (softmax(left_out / t), softmax(z_test @ weights / t)), cost


def per_label_variance(data: DataSet, loo: View, test: View, rows: npt.NDArray[np.intp]) -> Pair:
    """Gaussian log-likelihoods with covariance sigma_c^2 C per label: -q_c / (2 sigma_c^2) -
    (d / 2) log sigma_c^2, q_c the squared distance to the label's mean in C^-1, recovered from the
    discriminant's scores (q_c = x C^-1 x - 2 score_c); sigma_c^2 the label's mean q over its
    exemplars / d, shrunk towards the pooled one by a weight chosen by leave-one-out (weight 1
    is the discriminant)."""
    member = label_index(data.train_labels, data.train_labels)
    x = data.train.astype(np.float64)
    counts = np.bincount(member)
    means = np.zeros((len(counts), x.shape[1]))
    np.add.at(means, member, x)
    means /= counts[:, None]
    residuals = x - means[member]
    scatter = label_models.Scatter.of(residuals)
    inverse = scatter.inverse_times(np.eye(x.shape[1]), len(x) - len(counts))  # C^-1

    def quadratic(v: Floats) -> Floats:
        return np.asarray(np.einsum("ij,ij->i", v @ inverse, v))

    own = quadratic(residuals)
    d = x.shape[1]
    label_variance = np.bincount(member, weights=own) / counts / d
    pooled = float(own.mean()) / d

    def scores(view: View, queries: Points, shrink: float) -> Floats:
        variance = (1 - shrink) * label_variance + shrink * pooled
        q = quadratic(queries.astype(np.float64))[:, None] - 2 * view.discriminant
        return np.asarray(-q / (2 * variance) - 0.5 * d * np.log(variance))

    best = max(
        (0.0, 0.25, 0.5, 0.75, 0.9),
        key=lambda w: accuracy(scores(loo, data.train[rows], w), loo.truth),
    )
    loo_scores, test_scores = scores(loo, data.train[rows], best), scores(test, data.test, best)
    t = calibration.fitted_temperature(loo_scores, loo.truth, 0.01)
    print(f"# per-label variance: shrinkage {best} chosen", file=sys.stderr)
    return label_model_shares(loo_scores, t), label_model_shares(test_scores, t)


def chosen(
    evaluated: Evaluated, candidates: Iterable[tuple[str, Callable[[int], Floats]]]
) -> tuple[str, float, float]:
    """The candidate (name, shares of view 0 = leave-one-out / 1 = test) best on leave-one-out:
    its name, leave-one-out and test accuracy."""
    truth = (evaluated.loo.truth, evaluated.test.truth)
    best = max(candidates, key=lambda c: accuracy(c[1](0), truth[0]))
    return best[0], accuracy(best[1](0), truth[0]), accuracy(best[1](1), truth[1])


def methods(e: Evaluated) -> dict[str, tuple[str, float, float]]:
    c = e.components
    neighbours = [name for name in c if name.startswith("softmax")]
    ridges = [name for name in c if name.startswith("ridge lambda")]
    featured = {
        count: [name for name in c if name.startswith(f"ridge, {count} ")] for count, _ in FEATURES
    }

    def mix(*parts: tuple[float, str]) -> tuple[str, Callable[[int], Floats]]:
        name = " + ".join(f"{w:g} x {p}" for w, p in parts if w)
        return name, lambda v: np.asarray(sum(w * c[p][v] for w, p in parts if w))

    def geometric(w: float, a: str, b: str) -> tuple[str, Callable[[int], Floats]]:
        return (
            f"{w:g} log {a} + {1 - w:g} log {b}",
            lambda v: w * np.log(c[a][v] + 1e-9) + (1 - w) * np.log(c[b][v] + 1e-300),
        )

    def alone(names: list[str]) -> Iterable[tuple[str, Callable[[int], Floats]]]:
        def shares(name: str) -> Callable[[int], Floats]:
            return lambda v: c[name][v]

        return ((n, shares(n)) for n in names)

    def two_way(
        third: list[str], weights: Iterable[float]
    ) -> Iterable[tuple[str, Callable[[int], Floats]]]:
        return (
            mix((w, k), (1 - w, r)) for k, r, w in itertools.product(neighbours, third, weights)
        )

    def three_way(third: list[str]) -> Iterable[tuple[str, Callable[[int], Floats]]]:
        triples = [(a, b) for a in THIRDS for b in THIRDS if a > 0 and a + b <= 1.0001]
        return (
            mix((a, k), (b, "discriminant"), (round(1 - a - b, 1), r))
            for k, r, (a, b) in itertools.product(neighbours, third, triples)
        )

    out = {
        "mixture (the service's: weights 0.25 / 0.5 / 0.75)": chosen(
            e, two_way(["discriminant"], COARSE_WEIGHTS)
        ),
        "mixture, weights 0.05-0.95 by 0.05": chosen(e, two_way(["discriminant"], FINE_WEIGHTS)),
        "mixture, geometric (weighted log shares)": chosen(
            e,
            (geometric(w, k, "discriminant") for k in neighbours for w in FINE_WEIGHTS),
        ),
        "discriminant, per-label variance": chosen(e, alone(["discriminant, per-label variance"])),
        "mixture with the per-label-variance discriminant": chosen(
            e, two_way(["discriminant, per-label variance"], FINE_WEIGHTS)
        ),
        "ridge on x": chosen(e, alone(ridges)),
        "softmax + ridge on x": chosen(e, two_way(ridges, FINE_WEIGHTS)),
        "softmax + discriminant + ridge on x": chosen(e, three_way(ridges)),
    }
    for count, names in featured.items():
        out[f"ridge, {count} random features"] = chosen(e, alone(names))
        out[f"softmax + ridge, {count} random features"] = chosen(e, two_way(names, FINE_WEIGHTS))
        out[f"softmax + discriminant + ridge, {count} random features"] = chosen(
            e, three_way(names)
        )
    out["softmax + discriminant + ridge, random features (count too by leave-one-out)"] = max(
        (out[f"softmax + discriminant + ridge, {count} random features"] for count in featured),
        key=lambda result: result[1],
    )
    out["softmax + discriminant + ridge, 2048 random features, weights fixed 1/3 each"] = chosen(
        e,
        (
            mix((1 / 3, k), (1 / 3, "discriminant"), (1 / 3, r))
            for k, r in itertools.product(neighbours, featured[2048])
        ),
    )
    return out


def logistic(data: DataSet) -> tuple[float, float, float]:
    """LogisticRegression(C=10): test accuracy, 10-fold cross-validated accuracy on the
    leave-one-out sample's rows, and the CPU seconds of one fit."""
    member = label_index(data.train_labels, data.train_labels)
    model = LogisticRegression(C=10, max_iter=3000)
    started = time.process_time()
    model.fit(data.train, member)
    fit = time.process_time() - started
    test = accuracy(
        model.predict_proba(data.test), label_index(data.train_labels, data.test_labels)
    )
    predicted = np.empty(len(member), dtype=np.intp)
    for train, held in StratifiedKFold(10, shuffle=True, random_state=0).split(data.train, member):
        fold = LogisticRegression(C=10, max_iter=3000).fit(data.train[train], member[train])
        predicted[held] = fold.classes_[fold.predict_proba(data.train[held]).argmax(axis=1)]
    rows = loo_sample(len(member))
    return test, float((predicted[rows] == member[rows]).mean()), fit


def main() -> None:
    started = time.monotonic()
    sets, embedded = load(SETS)
    print(
        f"# The many-intent gap, {datetime.date.today()}: {embedded} texts embedded in this run\n"
    )
    table: dict[str, dict[str, tuple[str, float, float]]] = {}
    references: dict[str, tuple[float, float, float]] = {}
    costs: dict[str, dict[str, str]] = {}
    for name in SETS:
        evaluated = components(sets[name])
        table[name] = methods(evaluated)
        references[name] = logistic(sets[name])
        costs[name] = evaluated.costs
        print(f"# {name}: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    print("| method | " + " | ".join(SETS) + " |")
    print("|---|" + "---|" * len(SETS))
    first = next(iter(table.values()))
    for method in first:
        cells = []
        for name in SETS:
            _, loo_accuracy, test_accuracy = table[name][method]
            gap = 100 * (test_accuracy - references[name][0])
            cells.append(f"{100 * loo_accuracy:.2f} / {100 * test_accuracy:.2f} ({gap:+.2f})")
        print(f"| {method} | " + " | ".join(cells) + " |")
    cells = [f"{100 * cv:.2f} (10-fold) / {100 * test:.2f}" for test, cv, _ in references.values()]
    print("| LogisticRegression C=10 | " + " | ".join(cells) + " |")
    print("\nSettings chosen by leave-one-out:")
    for name in SETS:
        print(f"- {name}:")
        for method, (setting, _, _) in table[name].items():
            print(f"  - {method}: {setting}")
    print("\nCosts (one thread, CPU time):")
    for name in SETS:
        fit = references[name][2]
        print(
            f"- {name}: LogisticRegression fit {fit:.1f} s; "
            + "; ".join(f"{k}: {v}" for k, v in costs[name].items())
        )


if __name__ == "__main__":
    main()
