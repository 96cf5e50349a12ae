"""k-NN voting: from the nearest neighbours of a text to a label, a confidence and per-label scores.

A pure function of its inputs, so it is tested without a server, a store or an embedder.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class Voting(enum.StrEnum):
    MAJORITY = "majority"
    """One vote per neighbour."""
    SIMILARITY_WEIGHTED = "similarity_weighted"
    """Each neighbour votes with its cosine similarity, negative similarities counting as 0."""


class UnknownReason(enum.StrEnum):
    BELOW_MIN_SIMILARITY = "below_min_similarity"
    BELOW_MIN_CONFIDENCE = "below_min_confidence"


@dataclass(frozen=True, slots=True)
class Neighbour:
    id: str
    label: str
    text: str
    similarity: float


@dataclass(frozen=True, slots=True)
class Vote:
    label: str | None
    """The winning label, or None for unknown."""
    confidence: float
    """The best label's share of the vote, in [0, 1]."""
    scores: list[tuple[str, float]]
    """Every label that received a vote and its share, best first; the shares sum to 1."""
    voters: list[Neighbour]
    """The neighbours that voted, most similar first."""
    top_similarity: float
    """Similarity of the nearest neighbour (voter or not); -1 when there is none."""
    unknown_reason: UnknownReason | None


def vote(
    neighbours: Sequence[Neighbour],
    voting: Voting,
    min_similarity: float = -1.0,
    min_confidence: float = 0.0,
) -> Vote:
    """Votes over ``neighbours``; those under ``min_similarity`` do not vote.

    Ties go to the label whose best neighbour is the most similar, then to the smaller label, so
    the answer never depends on the order the store returned equal scores in.
    """
    ranked = sorted(neighbours, key=lambda n: -n.similarity)
    top_similarity = ranked[0].similarity if ranked else -1.0
    voters = [n for n in ranked if n.similarity >= min_similarity]
    if not voters:
        return Vote(None, 0.0, [], [], top_similarity, UnknownReason.BELOW_MIN_SIMILARITY)

    weights = _weights(voters, voting)
    totals: dict[str, float] = {}
    best_similarity: dict[str, float] = {}
    for neighbour, weight in zip(voters, weights, strict=True):
        totals[neighbour.label] = totals.get(neighbour.label, 0.0) + weight
        best_similarity.setdefault(neighbour.label, neighbour.similarity)
    grand_total = sum(totals.values())
    order = sorted(totals, key=lambda label: (-totals[label], -best_similarity[label], label))
    scores = [(label, totals[label] / grand_total) for label in order]

    winner, confidence = scores[0]
    if confidence < min_confidence:
        return Vote(
            None, confidence, scores, voters, top_similarity, UnknownReason.BELOW_MIN_CONFIDENCE
        )
    return Vote(winner, confidence, scores, voters, top_similarity, None)


def _weights(voters: Sequence[Neighbour], voting: Voting) -> list[float]:
    if voting is Voting.SIMILARITY_WEIGHTED:
        weights = [max(n.similarity, 0.0) for n in voters]
        if sum(weights) > 0.0:
            return weights
        # Every voter is at or below zero similarity: fall back to one vote each rather than
        # dividing by zero.
    return [1.0] * len(voters)
