"""CheckExemplars, the exemplar hygiene report, through the real server and client, checked
against a brute-force reference computed here from the fake embedder's vectors."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from knn_classifier.client import (
    AsyncClient,
    Client,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
)
from knn_classifier.server import hygiene, wire_size
from knn_classifier.v1 import classifier_pb2 as pb

from .conftest import ServerThread, make_settings
from .fake_embedder import FakeEmbeddingServer, fake_vector

VOCABULARIES = {
    "fruit": ["apple", "pear", "plum", "grape", "mango", "kiwi", "lemon", "melon"],
    "vehicle": ["car", "truck", "bus", "train", "bike", "tram", "ferry", "van"],
    "weather": ["rain", "snow", "sun", "wind", "fog", "storm", "hail", "cloud"],
}
MISLABELLED = [("apple mango kiwi", "vehicle"), ("rain snow fog", "fruit")]
DUPLICATES = [("car truck bus", "vehicle"), ("Car, truck bus!", "weather")]
"""The same words, so the same fake vector, under two labels."""
SMALL = [("hammer saw", "tool"), ("drill wrench", "tool")]
K = 5


def exemplars() -> list[tuple[str, str]]:
    rng = np.random.default_rng(7)
    items = []
    for label, words in VOCABULARIES.items():
        for _ in range(8):
            items.append((" ".join(rng.choice(words, 3, replace=False)), label))
    items += MISLABELLED + DUPLICATES + SMALL
    assert len({text for text, _ in items}) == len(items)
    return items


def reference(
    items: list[tuple[str, str]], ids: list[str], min_confidence: float, min_similarity: float
) -> dict[str, Any]:
    """The report by brute force: every pair's cosine, every exemplar's k nearest others by
    sorting, a majority vote counted by hand (ties to the most similar best neighbour, then the
    smaller label, as Classify breaks them)."""
    vectors = [fake_vector(text, 64).astype(np.float64) for text, _ in items]
    labels = [label for _, label in items]
    n = len(items)
    similarity = [[float(vectors[i] @ vectors[j]) for j in range(n)] for i in range(n)]
    voted: list[str] = []
    mislabelled = {}
    for i in range(n):
        others = sorted((j for j in range(n) if j != i), key=lambda j: -similarity[i][j])[:K]
        counts = Counter(labels[j] for j in others)
        best = {lab: max(similarity[i][j] for j in others if labels[j] == lab) for lab in counts}
        winner = min(counts, key=lambda lab: (-counts[lab], -best[lab], lab))
        voted.append(winner)
        share = counts[winner] / K
        if winner != labels[i] and share >= min_confidence:
            mislabelled[ids[i]] = (winner, share)
    duplicates = {
        frozenset((ids[i], ids[j])): similarity[i][j]
        for i, j in itertools.combinations(range(n), 2)
        if labels[i] != labels[j] and similarity[i][j] >= min_similarity
    }
    errors = Counter((labels[i], voted[i]) for i in range(n) if voted[i] != labels[i])
    overlaps = {
        (a, b): (errors[(a, b)], errors[(b, a)])
        for a, b in itertools.combinations(sorted(set(labels)), 2)
        if errors[(a, b)] or errors[(b, a)]
    }
    small = sorted((c, lab) for lab, c in Counter(labels).items() if c < 5)
    return {"mislabelled": mislabelled, "duplicates": duplicates, "overlaps": overlaps,
            "small": small}  # fmt: skip


@pytest.fixture
def loaded(client: Client) -> tuple[Client, list[tuple[str, str]], list[str]]:
    client.create_classifier("c", k=K, voting="majority")
    items = exemplars()
    ids = client.add_exemplars("c", items)
    return client, items, ids


def test_report_matches_a_brute_force_reference(
    loaded: tuple[Client, list[tuple[str, str]], list[str]],
) -> None:
    client, items, ids = loaded
    response = client.check_exemplars("c", min_confidence=0.6, min_duplicate_similarity=0.6)
    expected = reference(items, ids, 0.6, 0.6)

    found = {
        m.exemplar.id: (m.voted_label, pytest.approx(m.confidence, abs=1e-6))
        for m in response.likely_mislabelled_exemplars
    }
    assert found == expected["mislabelled"]
    confidences = [m.confidence for m in response.likely_mislabelled_exemplars]
    assert confidences == sorted(confidences, reverse=True)
    by_id = dict(zip(ids, items, strict=True))
    for m in response.likely_mislabelled_exemplars:
        assert (m.exemplar.text, m.exemplar.label) == by_id[m.exemplar.id]
    # The planted mislabels are among them, so the comparison is not between two empty sets.
    planted = {ids[items.index(item)] for item in MISLABELLED}
    assert planted <= set(found)

    pairs = {frozenset((d.first.id, d.second.id)): d.similarity for d in response.duplicates}
    assert pairs == pytest.approx(expected["duplicates"], abs=1e-5)
    assert frozenset(ids[items.index(item)] for item in DUPLICATES) in pairs
    for d in response.duplicates:
        assert d.first.label != d.second.label
        assert (d.first.text, d.first.label) == by_id[d.first.id]
    assert response.duplicates_found == len(expected["duplicates"])

    overlaps = {
        (o.first_label, o.second_label): (o.first_as_second, o.second_as_first)
        for o in response.overlapping_labels
    }
    assert overlaps == expected["overlaps"]
    assert [(c.count, c.label) for c in response.small_labels] == expected["small"] == [(2, "tool")]
    assert (response.checked, response.exemplar_count) == (len(items), len(items))
    assert (response.k, response.voting) == (K, pb.VOTING_MAJORITY)
    assert response.etag == client.get_classifier("c").etag


def test_overlap_shares_and_centroid_similarity(
    loaded: tuple[Client, list[tuple[str, str]], list[str]],
) -> None:
    client, items, _ = loaded
    response = client.check_exemplars("c", min_confidence=0.0)
    errors = Counter(m.exemplar.label for m in response.likely_mislabelled_exemplars)
    vectors: dict[str, np.ndarray] = {}
    for text, label in items:
        vectors[label] = vectors.get(label, 0) + fake_vector(text, 64).astype(np.float64)
    assert response.overlapping_labels
    for o in response.overlapping_labels:
        assert o.first_errors_share == pytest.approx(o.first_as_second / errors[o.first_label])
        if errors[o.second_label]:
            assert o.second_errors_share == pytest.approx(
                o.second_as_first / errors[o.second_label]
            )
        a, b = vectors[o.first_label], vectors[o.second_label]
        cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)
        assert o.centroid_similarity == pytest.approx(cosine, abs=1e-5)
    totals = [o.first_as_second + o.second_as_first for o in response.overlapping_labels]
    assert totals == sorted(totals, reverse=True)


def test_lists_are_cut_to_max_items_and_the_counts_stay_whole(
    loaded: tuple[Client, list[tuple[str, str]], list[str]],
) -> None:
    client, _, _ = loaded
    whole = client.check_exemplars("c", min_confidence=0.0, min_duplicate_similarity=0.3)
    assert whole.likely_mislabelled_exemplars_found > 1
    assert whole.duplicates_found > 1
    cut = client.check_exemplars("c", min_confidence=0.0, min_duplicate_similarity=0.3, max_items=1)
    assert len(cut.likely_mislabelled_exemplars) == len(cut.duplicates) == 1
    assert cut.likely_mislabelled_exemplars[0] == whole.likely_mislabelled_exemplars[0]
    assert cut.duplicates[0] == whole.duplicates[0]
    assert cut.likely_mislabelled_exemplars_found == whole.likely_mislabelled_exemplars_found
    assert cut.duplicates_found == whole.duplicates_found


def test_response_stays_under_the_budget(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    budget = 8 * 1024
    settings = make_settings(
        tmp_path, fake_embedder.base_url, limits={"max_response_bytes": budget}
    )
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("c", k=1, voting="majority")
            # Long texts each under two labels (the fake embedder ignores case): every exemplar's
            # nearest is its twin of the other label, so every one is a likely mislabel.
            long = [f"{'word ' * 300}{i}" for i in range(20)]
            client.add_exemplars("c", [(t, "a") for t in long] + [(t.upper(), "b") for t in long])
            response = client.check_exemplars("c", min_confidence=0.0, min_duplicate_similarity=0.5)
        assert response.ByteSize() <= budget
        found = response.likely_mislabelled_exemplars_found
        assert 0 < len(response.likely_mislabelled_exemplars) < found
        assert len(response.duplicates) < response.duplicates_found
    finally:
        running.stop()


def test_size_bounds_cover_the_messages() -> None:
    ref = hygiene.ExemplarRef("id-1", "text é" * 40, "label")
    mislabelled = hygiene.Mislabelled(ref, "other", 0.75)
    message = pb.CheckExemplarsResponse(
        likely_mislabelled_exemplars=[
            pb.LikelyMislabelled(
                exemplar=pb.CheckedExemplar(id=ref.id, text=ref.text, label=ref.label),
                voted_label="other",
                confidence=0.75,
            )
        ]
    )
    assert message.ByteSize() <= wire_size.mislabelled(mislabelled) <= message.ByteSize() + 64
    checked = pb.CheckedExemplar(id=ref.id, text=ref.text, label=ref.label)
    duplicate = pb.CheckExemplarsResponse(
        duplicates=[pb.CrossLabelDuplicate(first=checked, second=checked, similarity=0.9)]
    )
    estimate = wire_size.duplicate(hygiene.Duplicate(ref, ref, 0.9))
    assert duplicate.ByteSize() <= estimate <= duplicate.ByteSize() + 64
    overlap = hygiene.Overlap("a" * 30, "b" * 30, 2**40, 3, 0.5, 0.25, -0.5)
    listed = pb.CheckExemplarsResponse(
        overlapping_labels=[
            pb.LabelOverlap(
                first_label=overlap.first_label,
                second_label=overlap.second_label,
                first_as_second=overlap.first_as_second,
                second_as_first=overlap.second_as_first,
                first_errors_share=0.5,
                second_errors_share=0.25,
                centroid_similarity=-0.5,
            )
        ]
    )
    assert listed.ByteSize() <= wire_size.overlap(overlap) <= listed.ByteSize() + 64


def test_a_large_classifier_is_checked_on_a_sample(
    tmp_path: Path, fake_embedder: FakeEmbeddingServer
) -> None:
    settings = make_settings(tmp_path, fake_embedder.base_url, limits={"max_evaluated": 10})
    running = ServerThread(settings).start()
    try:
        with running.client() as client:
            client.create_classifier("c", k=3)
            client.add_exemplars("c", exemplars())
            response = client.check_exemplars("c", min_confidence=0.0)
        assert (response.checked, response.exemplar_count) == (10, len(exemplars()))
        assert response.likely_mislabelled_exemplars_found <= 10
    finally:
        running.stop()


def test_label_model_voting_finds_the_planted_mislabels(
    loaded: tuple[Client, list[tuple[str, str]], list[str]],
) -> None:
    client, items, ids = loaded
    client.update_classifier("c", voting="centroid")
    response = client.check_exemplars("c")
    assert response.voting == pb.VOTING_CENTROID
    found = {m.exemplar.id: m.voted_label for m in response.likely_mislabelled_exemplars}
    for text, label in MISLABELLED:
        assert found[ids[items.index((text, label))]] != label


def test_mixture_voting_is_checked_with_its_label_model(
    loaded: tuple[Client, list[tuple[str, str]], list[str]],
) -> None:
    """Mixture voting (the neighbours' softmax and the discriminant's shares) needs the label
    model's scores as Evaluate's sweep computes them; CheckExemplars computed them only for
    centroid and discriminant, so a classifier voting by mixture got INTERNAL."""
    client, items, ids = loaded
    client.update_classifier("c", voting="mixture")
    response = client.check_exemplars("c")
    assert response.voting == pb.VOTING_MIXTURE
    assert response.checked == len(items)
    found = {m.exemplar.id: m.voted_label for m in response.likely_mislabelled_exemplars}
    for text, label in MISLABELLED:
        assert found[ids[items.index((text, label))]] != label


async def test_async_client(
    server: ServerThread, loaded: tuple[Client, list[tuple[str, str]], list[str]]
) -> None:
    blocking = loaded[0].check_exemplars("c")
    async with AsyncClient(server.address) as client:
        assert await client.check_exemplars("c") == blocking


def test_bad_requests(client: Client) -> None:
    with pytest.raises(NotFoundError):
        client.check_exemplars("missing")
    client.create_classifier("c")
    client.add_exemplars("c", [("alpha", "a"), ("beta", "a")])
    with pytest.raises(FailedPreconditionError, match="at least two of each"):
        client.check_exemplars("c")
    client.add_exemplars("c", [("gamma", "b")])
    for bad, field in (
        ({"min_confidence": 1.5}, "min_confidence"),
        ({"min_duplicate_similarity": float("nan")}, "min_duplicate_similarity"),
        ({"min_label_exemplars": -1}, "min_label_exemplars"),
        ({"max_items": -2}, "max_items"),
    ):
        with pytest.raises(InvalidArgumentError, match=field):
            client.check_exemplars("c", **bad)
