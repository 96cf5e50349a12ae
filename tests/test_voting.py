import pytest

from knn_classifier.server.voting import Neighbour, UnknownReason, Voting, vote


def n(label: str, similarity: float, i: int = 0) -> Neighbour:
    return Neighbour(id=f"{label}{i}", label=label, text=f"text {label}{i}", similarity=similarity)


def test_majority_counts_one_vote_each() -> None:
    result = vote([n("a", 0.9), n("b", 0.8, 1), n("b", 0.7, 2)], Voting.MAJORITY)
    assert result.label == "b"
    assert result.confidence == pytest.approx(2 / 3)
    assert [label for label, _ in result.scores] == ["b", "a"]
    assert [share for _, share in result.scores] == pytest.approx([2 / 3, 1 / 3])


def test_similarity_weighting_can_overturn_the_majority() -> None:
    neighbours = [n("a", 0.95), n("b", 0.30, 1), n("b", 0.30, 2)]
    assert vote(neighbours, Voting.MAJORITY).label == "b"
    weighted = vote(neighbours, Voting.SIMILARITY_WEIGHTED)
    assert weighted.label == "a"
    assert weighted.confidence == pytest.approx(0.95 / 1.55)
    assert sum(score for _, score in weighted.scores) == pytest.approx(1.0)


def test_tie_goes_to_the_label_with_the_nearest_neighbour_whatever_the_order() -> None:
    forward = vote([n("z", 0.9), n("a", 0.8)], Voting.MAJORITY)
    backward = vote([n("a", 0.8), n("z", 0.9)], Voting.MAJORITY)
    assert forward.label == backward.label == "z"


def test_voters_are_sorted_most_similar_first() -> None:
    result = vote([n("a", 0.1), n("b", 0.9), n("a", 0.5, 1)], Voting.MAJORITY)
    assert [v.similarity for v in result.voters] == [0.9, 0.5, 0.1]
    assert result.top_similarity == 0.9


def test_neighbours_below_min_similarity_do_not_vote() -> None:
    result = vote([n("a", 0.9), n("b", 0.4, 1), n("b", 0.3, 2)], Voting.MAJORITY, 0.5)
    assert result.label == "a"
    assert [v.label for v in result.voters] == ["a"]


def test_unknown_when_nothing_is_similar_enough() -> None:
    result = vote([n("a", 0.2)], Voting.SIMILARITY_WEIGHTED, min_similarity=0.5)
    assert result.label is None
    assert result.unknown_reason is UnknownReason.BELOW_MIN_SIMILARITY
    assert result.top_similarity == 0.2
    assert result.scores == []


def test_unknown_when_the_vote_is_too_split() -> None:
    result = vote([n("a", 0.9), n("b", 0.9, 1)], Voting.MAJORITY, min_confidence=0.6)
    assert result.label is None
    assert result.unknown_reason is UnknownReason.BELOW_MIN_CONFIDENCE
    assert result.confidence == pytest.approx(0.5)
    assert len(result.scores) == 2


def test_weighted_vote_with_only_negative_similarities_falls_back_to_counting() -> None:
    result = vote([n("a", -0.1), n("b", -0.2, 1), n("b", -0.3, 2)], Voting.SIMILARITY_WEIGHTED)
    assert result.label == "b"
    assert result.confidence == pytest.approx(2 / 3)


def test_no_neighbours_is_unknown() -> None:
    result = vote([], Voting.MAJORITY)
    assert result.label is None
    assert result.top_similarity == -1.0
