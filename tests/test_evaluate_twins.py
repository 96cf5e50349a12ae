"""Evaluate's twin-aware leave-one-out (evaluate/twins.py) against brute-force references.

The fake embedder gives a text's vector from its lower-cased words, so "Pizza night?" and
"pizza night" are exact twins: the case and punctuation rewordings of crowd-sourced sets.
"""

from __future__ import annotations

import numpy as np
import pytest

from knn_classifier.client import Client
from knn_classifier.server.evaluate import twins

from .fake_embedder import fake_vector
from .test_evaluate_api import topical_texts


def reference_twins(
    vectors: np.ndarray, labels: list[str], sample: list[int]
) -> tuple[float, list[set[int]]]:
    """The twin threshold and each sampled exemplar's twins, one pair at a time."""
    distances = []
    for i in sample:
        others = [float(vectors[i] @ vectors[j]) for j in range(len(labels))]
        distances.append(1 - max(s for j, s in enumerate(others) if labels[j] != labels[i]))
    threshold = 1 - twins.TWIN_RATIO * float(np.median(distances))
    found = [
        {
            j
            for j in range(len(labels))
            if j != i and labels[j] == labels[i] and float(vectors[i] @ vectors[j]) > threshold
        }
        for i in sample
    ]
    return threshold, found


def reference_nearest_without_twins(
    vectors: np.ndarray, labels: list[str], sample: list[int]
) -> tuple[float, list[int]]:
    """The share of ``sample`` with a twin, and each one's nearest exemplar that is neither
    itself nor a twin."""
    _, found = reference_twins(vectors, labels, sample)
    nearest = []
    for i, left_out in zip(sample, found, strict=True):
        kept = [j for j in range(len(labels)) if j != i and j not in left_out]
        nearest.append(max(kept, key=lambda j: float(vectors[i] @ vectors[j])))
    return sum(bool(f) for f in found) / len(sample), nearest


def with_rewordings(rows: list[tuple[str, str]], every: int) -> list[tuple[str, str]]:
    """``rows`` and, for every ``every``-th one, its upper-cased twin with a question mark."""
    return rows + [(text.upper() + "?", label) for text, label in rows[::every]]


def test_twins_and_their_neighbours_match_a_brute_force_search() -> None:
    rng = np.random.default_rng(5)
    vectors = rng.standard_normal((60, 16))
    vectors[40:] = vectors[:20] + 0.02 * rng.standard_normal((20, 16))  # near copies
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    labels = [f"l{i % 4}" for i in range(40)] + [f"l{i % 4}" for i in range(20)]
    labels[45] = "l9"  # a near copy under another label is no twin
    sample = np.array([0, 3, 5, 17, 22, 41, 45, 59], dtype=np.intp)

    found = twins.leave_out(vectors, labels, sample, k=5)

    threshold, expected = reference_twins(vectors, labels, sample.tolist())
    assert found.threshold == pytest.approx(threshold, abs=1e-5)
    assert found.counts.tolist() == [len(e) for e in expected]
    assert 0 < found.share < 1  # some have twins, some none: the check can tell
    for row, (i, left_out) in enumerate(zip(sample.tolist(), expected, strict=True)):
        kept = sorted(
            (j for j in range(60) if j != i and j not in left_out),
            key=lambda j: -float(vectors[i] @ vectors[j]),
        )
        assert found.indices[row].tolist() == kept[:5]
        np.testing.assert_allclose(
            found.similarities[row], [vectors[i] @ vectors[j] for j in kept[:5]], rtol=1e-5
        )


def test_leave_one_out_without_twins_through_evaluate(client: Client) -> None:
    """1-NN leave-one-out with and without the twins, recomputed by brute force; the twins
    make plain leave-one-out right more often."""
    train = with_rewordings(topical_texts(90, seed=11), every=3)
    client.create_classifier("twins")
    client.add_exemplars("twins", train)
    response = client.evaluate("twins", k=[1], voting=["majority"])

    vectors = np.vstack([fake_vector(text, 64) for text, _ in train])
    labels = [label for _, label in train]
    everyone = list(range(len(train)))
    share, nearest = reference_nearest_without_twins(vectors, labels, everyone)
    expected = np.mean([labels[j] == labels[i] for i, j in zip(everyone, nearest, strict=True)])
    result = response.results[0]
    assert response.near_duplicates.share == pytest.approx(share)
    assert response.near_duplicates.sampled == len(train)
    assert response.near_duplicates.dimension == 64
    assert share == pytest.approx(60 / 120)  # the 30 rewordings and their 30 originals
    assert result.accuracy_without_twins == pytest.approx(expected)
    assert result.accuracy == result.accuracy_without_twins  # the default estimate
    assert result.accuracy_with_twins > expected + 0.1  # plain leave-one-out counts on the twins

    held = client.evaluate("twins", held_out=[("pizza goal", "food")], k=[1])
    assert not held.HasField("near_duplicates")
    assert not held.results[0].HasField("accuracy_without_twins")
    assert not held.results[0].HasField("accuracy_with_twins")


def test_a_label_made_of_twins_is_answered_by_the_other_labels(client: Client) -> None:
    """With its twins left out, an exemplar of a label of three twins has one neighbour left
    of three asked for: the other label's, which answers (the twins do not vote from past the
    end of the list)."""
    client.create_classifier("tiny")
    client.add_exemplars(
        "tiny", [("pizza pasta", "food"), ("Pizza pasta?", "food"), ("PIZZA PASTA!", "food"),
                 ("bank loan", "money")],
    )  # fmt: skip
    result = client.evaluate("tiny", k=[3], voting=["majority"]).results[0]
    assert result.accuracy_with_twins == pytest.approx(0.75)  # food answered by its twins
    assert result.accuracy_without_twins == pytest.approx(0.0)
    assert result.accuracy == pytest.approx(0.0)
