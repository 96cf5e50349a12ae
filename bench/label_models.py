"""What fitting the label models costs, beside the numpy work it cannot avoid.

    python bench/label_models.py        # `make bench-label-models`; prints two tables

For random unit vectors in 77 labels at several sizes, one BLAS thread (as the service runs):
the discriminant fit (done once after each write, in a worker thread), its exact leave-one-out
over at most 2,000 exemplars (Evaluate), the centroid fit, and the baseline: numpy's
eigendecomposition of the smaller Gram matrix of the same vectors, which the fit contains.
Then Evaluate's temperature fit over 2,000 leave-one-out rows of scores for 2 to 1,000 labels,
beside one softmax over the same scores.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # before numpy loads, as in the service

import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from knn_classifier.server import calibration, label_models

SIZES = [(385, 384), (10_000, 384), (385, 2560), (2_000, 2560), (10_000, 2560)]
LABELS = 77
LEAVE_ONE_OUT = 2_000
TEMPERATURE_LABELS = [2, 77, 1_000]


def seconds(work: Callable[..., object], *args: object) -> float:
    started = time.perf_counter()
    work(*args)
    return time.perf_counter() - started


def gram_eigh(vectors: np.ndarray) -> None:
    """The eigendecomposition of the smaller Gram matrix of ``vectors``."""
    x = vectors.astype(np.float64)
    np.linalg.eigh(x @ x.T if x.shape[0] <= x.shape[1] else x.T @ x)


def main() -> None:
    rng = np.random.default_rng(0)
    print("| exemplars x dimensions | discriminant fit s | leave-one-out s (rows) | ", end="")
    print("centroid fit s | numpy eigh of the Gram matrix s |")
    print("|---|---|---|---|---|")
    for count, dimension in SIZES:
        vectors = rng.standard_normal((count, dimension)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        labels = [f"l{i % LABELS}" for i in range(count)]
        rows = np.arange(min(count, LEAVE_ONE_OUT))
        cells = [
            seconds(label_models.discriminant, labels, vectors),
            seconds(label_models.leave_one_out_discriminant, labels, vectors, rows),
            seconds(label_models.centroids, labels, vectors),
            seconds(gram_eigh, vectors),
        ]
        print(
            f"| {count:,} x {dimension:,} | {cells[0]:.2f} | {cells[1]:.2f} ({len(rows):,}) | "
            f"{cells[2]:.3f} | {cells[3]:.2f} |",
            flush=True,
        )
    print()
    temperature_table(rng)


def softmax(scores: np.ndarray) -> None:
    margins = scores - scores.max(axis=1, keepdims=True)
    np.exp(margins) / np.exp(margins).sum(axis=1, keepdims=True)


def temperature_table(rng: np.random.Generator) -> None:
    print("| rows x labels | temperature fit s | one softmax s |")
    print("|---|---|---|")
    for labels in TEMPERATURE_LABELS:
        scores = rng.normal(0, 0.05, (LEAVE_ONE_OUT, labels))
        truth = rng.integers(0, labels, LEAVE_ONE_OUT)
        fit = seconds(calibration.fitted_temperature, scores, truth, 0.01)
        print(f"| {LEAVE_ONE_OUT:,} x {labels:,} | {fit:.3f} | {seconds(softmax, scores):.4f} |")


if __name__ == "__main__":
    main()
