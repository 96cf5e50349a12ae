"""Far out-of-scope texts: what the combined score keeps that the top similarity rejects, and
variants of the score's p-values and of its combination, at the thresholds fitted on
leave-one-out (issue 14, part 2).

    python bench/open_set_far.py [--seeds 5]

Protocols (cached vectors, as bench/open_set_variants.py): banking77 with 27 of 77 intents held
out and HWU64 with 16 of 64, full and 10 per intent, numpy seeds 0..S-1; a classifier of HWU64
with banking77's test texts out of scope and the reverse; and each with waimai_10k's test texts
(Chinese food-delivery reviews) out of scope. For every variant, with the threshold fitted for
98 % kept on the exemplars' leave-one-out scores (Evaluate's sample of at most 5,000): the
out-of-scope recall (mean, and ± its standard deviation over the draws), the in-scope test texts
kept, and the recall paired draw by draw against the service's score.

Every p-value reference is kept as the service keeps it, at most 256 quantiles of the
leave-one-out scores, unless the variant says otherwise. Then, for banking77's classifier
against HWU64's texts: the texts the service's score keeps that the top similarity rejects,
with each part's log p-value.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import argparse
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from statistics import NormalDist

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.open_set import FEW_SHOT, NEAR, DataSet, Protocol, load, near, rows
from bench.open_set_variants import Side, agreement, sides
from knn_classifier.server import open_set, out_of_scope

Floats = npt.NDArray[np.float64]
Pair = tuple[Floats, Floats]
"""A variant's scores of the test texts (in scope first) and of the leave-one-out exemplars."""
PValues = Callable[[Floats, int, Floats], Floats]
"""(reference quantiles or scores, how many scores they summarise, texts) -> p-values."""
TARGET = 0.98
SERVICE = "service: F(3), 256 quantiles, interpolated"
BEFORE = "F(3), 256 quantiles, steps (the service before)"
BASELINE = "top similarity (baseline)"


def far_protocols(sets: dict[str, DataSet], seeds: int) -> Iterator[Protocol]:
    for name, held in NEAR.items():
        for shots in (None, FEW_SHOT):
            regime = f"{shots}/intent" if shots else "full"
            for seed in range(seeds):
                yield near(sets[name], held, shots, seed, f"{name} near, {regime}")
    for trained, other in (
        ("hwu64", "banking77"),
        ("banking77", "hwu64"),
        ("hwu64", "waimai_10k"),
        ("banking77", "waimai_10k"),
    ):
        data = sets[trained]
        title = f"{trained} vs {other} test texts"
        yield Protocol(title, None, data.train, data.train_labels, data.test, sets[other].test, [])


def quantiles(values: Floats, points: int = out_of_scope.REFERENCE_POINTS) -> Floats:
    ordered = np.sort(values)
    if len(ordered) > points:
        ordered = np.quantile(ordered, np.linspace(0.0, 1.0, points))
    return np.asarray(ordered)


def steps(reference: Floats, size: int, texts: Floats) -> Floats:
    return open_set.p_values(reference, texts)


def interpolated(reference: Floats, size: int, texts: Floats) -> Floats:
    return open_set.p_values(reference, texts, size)


def tail_share(reference: Floats, share: float) -> Floats:
    """The reference's lowest ``share`` (at least two points)."""
    return reference[: max(2, round(share * (len(reference) - 1)) + 1)]


def exponential_tail(share: float) -> PValues:
    """Interpolated, and below the lowest reference continued as an exponential tail whose scale
    is the mean excess of the lowest ``share`` of the references (a generalised Pareto tail of
    shape 0, peaks over threshold)."""

    def p(reference: Floats, size: int, texts: Floats) -> Floats:
        low = tail_share(reference, share)
        scale = max(float(np.mean(low[-1] - low)), 1e-12)
        beyond = np.exp(-np.maximum(reference[0] - texts, 0.0) / scale)
        return np.asarray(interpolated(reference, size, texts) * beyond)

    return p


def fisher(parts: list[Pair], p: PValues = interpolated, points: int = 256) -> Pair:
    test, loo = np.zeros(len(parts[0][0])), np.zeros(len(parts[0][1]))
    for t, lo in parts:
        reference = quantiles(lo, points)
        test += np.log(p(reference, len(lo), t))
        loo += np.log(p(reference, len(lo), lo))
    return test, loo


def combined(parts: list[Pair], how: str) -> Pair:
    """Other combinations of the interpolated p-values (higher: more in scope)."""
    out = []
    for side in (0, 1):
        ps = np.array([interpolated(quantiles(lo), len(lo), (t, lo)[side]) for t, lo in parts])
        if how == "Cauchy (ACAT)":
            out.append(-np.mean(np.tan((0.5 - ps) * np.pi), axis=0))
        elif how == "harmonic mean p":
            out.append(-np.mean(1 / ps, axis=0))
        elif how == "Stouffer":
            inverse = np.vectorize(NormalDist().inv_cdf)
            out.append(np.sum(inverse(np.minimum(ps, 1 - 1e-9)), axis=0))  # p = 1: z finite
        else:  # "Fisher + a x min log p"
            weight = float(how.split("+ ")[1].split(" x")[0])
            logs = np.log(ps)
            out.append(logs.sum(axis=0) + weight * logs.min(axis=0))
    return out[0], out[1]


def guarded(score: Pair, guard: Pair, share: float) -> Pair:
    """Out of scope if the score is under its threshold or the guard under the quantile
    ``share`` of its leave-one-out values; the score's threshold refitted so that both together
    keep the target (a guarded text scores -inf)."""
    limit = np.quantile(guard[1], share)
    return (
        np.where(guard[0] >= limit, score[0], -np.inf),
        np.where(guard[1] >= limit, score[1], -np.inf),
    )


def variants(test: Side, loo: Side, member: npt.NDArray[np.intp]) -> dict[str, Pair]:
    def both(f: Callable[[Side], Floats]) -> Pair:
        return f(test), f(loo)

    top = both(lambda s: s.similarities[:, 0])
    parts = [
        both(lambda s: s.relative),
        both(lambda s: s.mahalanobis),
        both(lambda s: agreement(s, member, 10)),
    ]
    lee = both(lambda s: -s.within.min(axis=1))
    background = both(lambda s: -s.background)
    service = fisher(parts)
    found = {
        BASELINE: top,
        BEFORE: fisher(parts, steps),
        SERVICE: service,
        "F(3), every leave-one-out score, steps": fisher(parts, steps, 10**9),
    }
    for points in (64, 128, 512, 1024):
        found[f"F(3), {points} quantiles, steps"] = fisher(parts, steps, points)
        found[f"F(3), {points} quantiles, interpolated"] = fisher(parts, interpolated, points)
    for share in (0.02, 0.05, 0.10):
        found[f"+ exponential tail below the lowest ({share:.0%} mean excess)"] = fisher(
            parts, exponential_tail(share)
        )
    found["F(3, top similarity)"] = fisher([*parts, top])
    found["F(3, Mahalanobis (Lee))"] = fisher([*parts, lee])
    found["F(3, background distance)"] = fisher([*parts, background])
    guards = {
        "top similarity": top,
        "Mahalanobis (Lee)": lee,
        "background distance": background,
        "mean of the 3 nearest similarities": both(lambda s: s.similarities[:, :3].mean(axis=1)),
        "label-relative similarity": parts[0],
        "relative Mahalanobis": parts[1],
    }
    for name, guard in guards.items():
        for share in (0.001, 0.002, 0.005):
            found[f"guard: {name} under its {share:.1%} quantile"] = guarded(service, guard, share)
    for how in (
        "Cauchy (ACAT)",
        "harmonic mean p",
        "Stouffer",
        "Fisher + 0.5 x min log p",
        "Fisher + 1 x min log p",
    ):
        found[how] = combined(parts, how)
    return found


def fitted(pair: Pair, inside: int) -> tuple[float, float]:
    """In-scope test texts kept and out-of-scope recall at the threshold fitted for TARGET."""
    test, loo = pair
    threshold = open_set.coverage_threshold(loo, TARGET)
    return float((test[:inside] >= threshold).mean()), float((test[inside:] < threshold).mean())


def summarise(values: list[float], signed: bool = False) -> str:
    form = "+.3f" if signed else ".3f"
    if len(values) == 1:
        return f"{values[0]:{form}}"
    return f"{statistics.mean(values):{form}} ± {statistics.stdev(values):.3f}"


def diagnosis(protocol: Protocol, test: Side, loo: Side, member: npt.NDArray[np.intp]) -> None:
    """The texts the service's score keeps that the baseline rejects, with each part's log p."""
    found = variants(test, loo, member)
    inside = len(protocol.in_scope)
    parts = [
        (test.relative, loo.relative),
        (test.mahalanobis, loo.mahalanobis),
        (agreement(test, member, 10), agreement(loo, member, 10)),
    ]
    logs = [np.log(interpolated(quantiles(lo), len(lo), t)) for t, lo in parts]
    score, loo_score = found[SERVICE]
    threshold = open_set.coverage_threshold(loo_score, TARGET)
    top, loo_top = found[BASELINE]
    limit = open_set.coverage_threshold(loo_top, TARGET)
    top_log = np.log(interpolated(quantiles(loo_top), len(loo_top), top))
    texts = [t for t, _ in rows(protocol.name.split(" vs ")[1].split(" test")[0])[1]]
    labels = sorted(set(protocol.train_labels.tolist()))
    kept = np.flatnonzero((score[inside:] >= threshold) & (top[inside:] < limit))
    lost = np.flatnonzero((score[inside:] < threshold) & (top[inside:] >= limit))
    in_ours = int(np.sum(score[:inside] < threshold))
    in_base = int(np.sum(top[:inside] < limit))
    share = float(np.mean(score[:inside] >= threshold))
    same = [  # recall at the oracle thresholds keeping the service's share of in-scope texts
        float(np.mean(s[inside:] < np.quantile(s[:inside], 1 - share))) for s in (score, top)
    ]
    print(
        f"\n{protocol.name}: the service's score (threshold {threshold:.2f}) keeps {len(kept)} "
        f"texts the top similarity (threshold {limit:.3f}) rejects, and rejects {len(lost)} it "
        f"keeps; of the in-scope test texts it rejects {in_ours}, the baseline {in_base}. "
        f"Keeping the same {share:.3f} of the in-scope test texts (oracle thresholds), the "
        f"service's score rejects {same[0]:.4f}, the top similarity {same[1]:.4f}.\n"
    )
    print("| text | nearest label | top similarity | log p: top | label-relative | "
          "relative Mahalanobis | agreement | combined |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for i in kept.tolist():
        row = inside + i
        print(
            f"| {texts[i][:60].replace('|', '/')} | {labels[member[test.indices[row, 0]]]} "
            f"| {top[row]:.3f} "
            f"| {top_log[row]:.2f} | {logs[0][row]:.2f} | {logs[1][row]:.2f} "
            f"| {logs[2][row]:.2f} | {score[row]:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    sets, _ = load(["banking77", "hwu64", "waimai_10k"])
    results: dict[str, dict[str, list[tuple[float, float]]]] = {}
    explained = None
    for protocol in far_protocols(sets, args.seeds):
        test, loo, member = sides(protocol)
        for variant, pair in variants(test, loo, member).items():
            results.setdefault(protocol.name, {}).setdefault(variant, []).append(
                fitted(pair, len(protocol.in_scope))
            )
        if protocol.name == "banking77 vs hwu64 test texts":
            explained = (protocol, test, loo, member)
        print(f"# {protocol.name} seed {protocol.seed}", file=sys.stderr, flush=True)
    names = list(results)
    print(
        "Out-of-scope recall at the threshold fitted for 98 % kept (in-scope test texts kept; "
        "paired difference from the service's score)\n"
    )
    print("| variant | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for variant in results[names[0]]:
        cells = []
        for name in names:
            runs = results[name][variant]
            recall = [r for _, r in runs]
            paired = [a - b for a, (_, b) in zip(recall, results[name][SERVICE], strict=True)]
            kept = statistics.mean(k for k, _ in runs)
            cells.append(f"{summarise(recall)} ({kept:.3f}) {summarise(paired, True)}")
        print(f"| {variant} | " + " | ".join(cells) + " |", flush=True)
    if explained is not None:
        diagnosis(*explained)


if __name__ == "__main__":
    main()
