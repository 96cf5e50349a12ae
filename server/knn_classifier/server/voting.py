"""k-NN voting: from the nearest neighbours of a text to a label, a confidence and per-label scores.

A pure function of its inputs, so it is tested without a server, a store or an embedder.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .calibration import Calibration


class Voting(enum.StrEnum):
    MAJORITY = "majority"
    """One vote per neighbour."""
    SIMILARITY_WEIGHTED = "similarity_weighted"
    """Each neighbour votes with its cosine similarity, negative similarities counting as 0."""
    SOFTMAX = "softmax"
    """Each neighbour votes with exp(similarity / temperature): the nearest ones dominate."""
    CENTROID = "centroid"
    """Each label scores exp(similarity / temperature) of the text to the label's centroid (the
    normalised mean of its exemplars); the neighbours are the explanation, not the votes. With
    few exemplars per label a centroid averages out their noise (docs/accuracy.md)."""
    DISCRIMINANT = "discriminant"
    """Each label scores exp(score / temperature), its score the text's linear discriminant for
    the label (see :mod:`label_models`); the neighbours are the explanation, not the votes."""
    MIXTURE = "mixture"
    """:data:`MIXTURE_WEIGHT` x softmax voting's shares + the rest x the discriminant's shares
    (at the label temperature): the neighbours and the discriminant err on different texts
    (docs/accuracy.md, "The many-intent gap")."""


LABEL_SCORED = frozenset({Voting.CENTROID, Voting.DISCRIMINANT})
"""The methods that score labels as a whole (:mod:`label_models`) rather than by neighbours."""
MIXTURE_WEIGHT = 0.5
"""The neighbours' weight in mixture voting. On HWU64 and banking77 leave-one-out chose 0.5 of
0.25 / 0.5 / 0.75 (docs/accuracy.md)."""
LABEL_TEMPERATURE = 0.01
"""The discriminant's temperature in mixture voting until Evaluate fits one, and the centre of
that fit's prior."""


class UnknownReason(enum.StrEnum):
    BELOW_MIN_SIMILARITY = "below_min_similarity"
    BELOW_MIN_CONFIDENCE = "below_min_confidence"
    OUT_OF_SCOPE = "out_of_scope"
    AMBIGUOUS = "ambiguous"
    """In scope (its out-of-scope check passed) but under min_confidence."""


@dataclass(frozen=True, slots=True)
class ScopeCheck:
    """A text's out-of-scope score against the classifier's fitted threshold
    (:mod:`out_of_scope`)."""

    score: float
    threshold: float
    target_coverage: float


@dataclass(frozen=True, slots=True)
class Neighbour:
    id: str
    label: str
    text: str
    similarity: float
    out_of_scope: bool = False
    """A negative exemplar: never a voter, only the reason of a vetoed answer."""


@dataclass(frozen=True, slots=True)
class Vote:
    label: str | None
    """The winning label, or None for unknown."""
    confidence: float
    """The winner's share of the vote, or the calibrated probability that it is right."""
    scores: list[tuple[str, float]]
    """Every label that received a vote and its share, best first; the shares sum to 1."""
    voters: list[Neighbour]
    """The neighbours that voted, most similar first."""
    top_similarity: float
    """Similarity of the nearest neighbour (voter or not); -1 when there is none."""
    unknown_reason: UnknownReason | None
    best_label: str | None = None
    """The label with the highest score, even when the answer is unknown."""
    out_of_scope: ScopeCheck | None = None
    """The out-of-scope check, when the classifier has a threshold in the dimension answered."""

    @property
    def candidates(self) -> list[str]:
        """The best two labels of an ambiguous answer, best first; otherwise none."""
        if self.unknown_reason is not UnknownReason.AMBIGUOUS:
            return []
        return [label for label, _ in self.scores[:2]]


def vote(
    neighbours: Sequence[Neighbour],
    voting: Voting,
    min_similarity: float = -1.0,
    min_confidence: float = 0.0,
    temperature: float = 0.05,
    calibration: Calibration | None = None,
    label_scores: Sequence[tuple[str, float]] = (),
    label_temperature: float = LABEL_TEMPERATURE,
) -> Vote:
    """Votes over ``neighbours``; those under ``min_similarity`` do not vote.

    Centroid and discriminant voting score the labels in ``label_scores`` (label, the text's
    score for it) instead; ``min_similarity`` still applies to the nearest neighbour. Mixture
    voting mixes softmax voting's shares with those of ``label_scores`` at
    ``label_temperature``.

    Ties go to the label whose best neighbour is the most similar, then to the smaller label, so
    the answer never depends on the order the store returned equal scores in.
    """
    ranked = sorted(neighbours, key=lambda n: -n.similarity)
    top_similarity = ranked[0].similarity if ranked else -1.0
    voters = [n for n in ranked if n.similarity >= min_similarity]
    if not voters:
        return Vote(None, 0.0, [], [], top_similarity, UnknownReason.BELOW_MIN_SIMILARITY)

    totals: dict[str, float] = {}
    best_similarity: dict[str, float] = {}
    if voting in LABEL_SCORED:
        totals = _label_shares(label_scores, temperature)
        best_similarity = dict(label_scores)
    elif voting is Voting.MIXTURE:
        weights = _weights(voters, Voting.SOFTMAX, temperature)
        total = sum(weights)
        model_shares = _label_shares(label_scores, label_temperature)
        model_total = sum(model_shares.values())
        totals = {
            label: (1 - MIXTURE_WEIGHT) * share / model_total
            for label, share in model_shares.items()
        }
        best_similarity = {label: -math.inf for label in totals}
        for neighbour, weight in zip(voters, weights, strict=True):
            share = MIXTURE_WEIGHT * weight / total
            totals[neighbour.label] = totals.get(neighbour.label, 0.0) + share
            best_similarity[neighbour.label] = max(
                best_similarity.get(neighbour.label, -math.inf), neighbour.similarity
            )
    else:
        weights = _weights(voters, voting, temperature)
        for neighbour, weight in zip(voters, weights, strict=True):
            totals[neighbour.label] = totals.get(neighbour.label, 0.0) + weight
            best_similarity.setdefault(neighbour.label, neighbour.similarity)
    grand_total = sum(totals.values())
    order = sorted(totals, key=lambda label: (-totals[label], -best_similarity[label], label))
    scores = [(label, totals[label] / grand_total) for label in order]

    winner, share = scores[0]
    confidence = calibration(share) if calibration else share
    if confidence < min_confidence:
        reason = UnknownReason.BELOW_MIN_CONFIDENCE
        return Vote(None, confidence, scores, voters, top_similarity, reason, winner)
    return Vote(winner, confidence, scores, voters, top_similarity, None, winner)


def _label_shares(
    label_scores: Sequence[tuple[str, float]], temperature: float
) -> dict[str, float]:
    """Each label's exp((score - best) / temperature), summing to at most the label count."""
    top = max(score for _, score in label_scores)
    return {label: math.exp((score - top) / temperature) for label, score in label_scores}


def _weights(voters: Sequence[Neighbour], voting: Voting, temperature: float) -> list[float]:
    if voting is Voting.SOFTMAX:
        top = voters[0].similarity
        return [math.exp((n.similarity - top) / temperature) for n in voters]
    if voting is Voting.SIMILARITY_WEIGHTED:
        weights = [max(n.similarity, 0.0) for n in voters]
        if sum(weights) > 0.0:
            return weights
        # Every voter is at or below zero similarity: fall back to one vote each rather than
        # dividing by zero.
    return [1.0] * len(voters)
