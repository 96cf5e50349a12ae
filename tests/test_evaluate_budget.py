"""Evaluate's response under the response budget: per-label metrics are left out of the last
settings' results when they would not fit, and a response that cannot fit even without them is
refused before apply_best stores anything."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from knn_classifier.client import Client, ResourceExhaustedError
from knn_classifier.server import evaluation_messages, wire_size
from knn_classifier.server.evaluate.metrics import LabelMetrics, OutOfScopeMetrics, Report
from knn_classifier.server.evaluate.votes import Setting
from knn_classifier.server.out_of_scope import OutOfScopeFit
from knn_classifier.server.voting import Voting
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer

BUDGET = 24 * 1024
LABELS = [f"label-{i:03d}-" + "q" * 30 for i in range(100)]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]


def sweep(client: Client) -> pb.EvaluateResponse:
    """Eight settings of leave-one-out."""
    return client.evaluate("c", k=[1, 3, 5, 7], voting=["majority", "softmax"])


def fill(client: Client) -> None:
    """100 labels of 2 exemplars: each setting's per-label metrics take about 4.7 KB."""
    rng = random.Random(7)
    client.create_classifier("c")
    client.add_exemplars(
        "c",
        [(f"{' '.join(rng.sample(WORDS, 3))} {label[:9]} {i}", label)
         for i in range(2) for label in LABELS],
    )  # fmt: skip


@pytest.fixture
def budgeted(tmp_path: Path, fake_embedder: FakeEmbeddingServer) -> Iterator[Client]:
    """A server whose responses must stay under 24 KiB, holding classifier "c"."""
    settings = make_settings(
        tmp_path / "budgeted", fake_embedder.base_url, limits={"max_response_bytes": BUDGET}
    )
    running = ServerThread(settings).start()
    with running.client() as client:
        fill(client)
        yield client
    running.stop()


def without_labels(response: pb.EvaluateResponse) -> list[pb.EvaluationResult]:
    results = [pb.EvaluationResult() for _ in response.results]
    for result, given in zip(results, response.results, strict=True):
        result.CopyFrom(given)
        del result.labels[:]
    return results


def test_the_last_settings_lose_their_per_label_metrics_to_keep_under_the_budget(
    budgeted: Client,
) -> None:
    bounded = sweep(budgeted)
    assert bounded.ByteSize() <= BUDGET
    dropped = bounded.results_without_labels
    kept = len(bounded.results) - dropped
    assert 0 < dropped < len(bounded.results)
    assert [len(r.labels) for r in bounded.results] == [len(LABELS)] * kept + [0] * dropped
    assert all(r.evaluated == 2 * len(LABELS) and r.top_confusions for r in bounded.results)

    last = bounded.results[-1]  # as the proto says: evaluate that setting alone
    voting = pb.Voting.Name(last.voting).removeprefix("VOTING_").lower()
    alone = budgeted.evaluate("c", k=[last.k], voting=[voting])
    assert alone.results_without_labels == 0
    assert len(alone.results[0].labels) == len(LABELS)
    assert without_labels(alone) == [last]
    labels_bytes = pb.EvaluationResult(labels=alone.results[0].labels).ByteSize()
    assert bounded.ByteSize() + dropped * labels_bytes > BUDGET  # whole, it would not fit


def test_a_sweep_too_large_even_without_labels_is_refused_before_apply_best_stores_it(
    budgeted: Client,
) -> None:
    before = budgeted.get_classifier("c")
    with pytest.raises(ResourceExhaustedError) as refused:
        budgeted.evaluate(
            "c", k=range(1, 9), voting=["majority", "softmax", "centroid", "discriminant"],
            apply_best=True,
        )  # fmt: skip
    assert refused.value.reason == "RESPONSE_TOO_LARGE"
    assert f"response budget of {BUDGET} bytes" in str(refused.value)
    assert "evaluate fewer settings per call" in str(refused.value)
    after = budgeted.get_classifier("c")
    assert after.etag == before.etag
    assert not after.calibrated


def test_the_estimates_bound_the_encoded_sizes() -> None:
    references = tuple(np.linspace(-1, 1, 256))
    rule = OutOfScopeFit(64, 0.98, -3.5, 0.99, references, references, references, 2**62)
    long = "é" * 256
    report = Report(
        setting=Setting(200, Voting.DISCRIMINANT, 2560, 0.05),
        accuracy=0.5, macro_f1=0.5, coverage=0.5, accuracy_on_covered=0.5,
        expected_calibration_error=0.5, evaluated=2**40,
        labels=[LabelMetrics(f"{long}{i}", 0.1, 0.2, 0.3, 2**40) for i in range(50)],
        confusions=[(long, f"{long}{i}", 2**40) for i in range(10)],
        out_of_scope=OutOfScopeMetrics(2**40, 2**40, 0.1, 0.2, 0.3, 0.4, 0.5, rule),
    )  # fmt: skip
    labels = wire_size.label_metrics(report.labels)
    whole = evaluation_messages._evaluation_result(report, True)
    bare = evaluation_messages._evaluation_result(report, False)
    assert pb.EvaluateResponse(results=[bare]).ByteSize() <= wire_size.evaluation_result(report)
    assert pb.EvaluateResponse(results=[whole]).ByteSize() <= (
        wire_size.evaluation_result(report) + labels
    )
    assert labels <= 1.2 * (whole.ByteSize() - bare.ByteSize())
