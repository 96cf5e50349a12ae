"""Near-duplicate "twins" among the exemplars, and leave-one-out without them.

Crowd-sourced exemplars hold near-paraphrases of each other ("Can I ...?", "can i ...",
"please, can I ..."): leaving one out leaves its twin in, which answers for it, and leave-one-out
overestimates what the classifier gets right on new texts. Twin-aware leave-one-out leaves out,
with each sampled exemplar, its twins too: the exemplars of its label whose cosine distance to it
(1 - similarity) is under :data:`TWIN_RATIO` times the median distance of the sampled exemplars
to their nearest exemplar of another label.

Exemplars of two labels are never rewordings of one text, so their typical distance is the
scale of "similar but distinct" for this embedding model and data; a rewording is far closer.
The rule is unchanged when a model's similarities are compressed towards 1 (distances scaled),
where a fixed similarity is not: 0.97 already takes ordinary paraphrases from multilingual-e5's
labels. Neither a few texts stored under two labels nor the twins themselves (which are within
a label) move the median. The label models keep the twins in their means: there a twin is one
exemplar among its label's many (docs/accuracy.md, "Leave-one-out with twins").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..vectors import Matrix
from .neighbours import BLOCK, top_k

TWIN_RATIO = 0.25
"""A twin is closer than this share of the median distance to the nearest other label."""


@dataclass(frozen=True, slots=True)
class Twins:
    """The sampled exemplars' twins, and their neighbours without them."""

    threshold: float
    """An exemplar of the same label more similar than this is a twin."""
    counts: npt.NDArray[np.intp]
    """How many twins each sampled exemplar has."""
    indices: npt.NDArray[np.intp]
    """Each sampled exemplar's nearest exemplars, neither itself nor its twins, best first."""
    similarities: Matrix
    """Their similarities; -inf past the exemplars left (a tiny label full of twins)."""
    dimension: int
    """The vectors' dimension the twins were found in."""

    @property
    def share(self) -> float:
        """The share of the sampled exemplars with at least one twin."""
        return float((self.counts > 0).mean()) if len(self.counts) else 0.0


def _codes(labels: list[str]) -> npt.NDArray[np.intp]:
    return np.unique(np.asarray(labels), return_inverse=True)[1].astype(np.intp)


def nearest_other_label(
    vectors: Matrix, labels: list[str], sample: npt.NDArray[np.intp]
) -> npt.NDArray[np.float64]:
    """Each of ``sample``'s similarity to its nearest exemplar of another label (there are at
    least two labels)."""
    codes = _codes(labels)
    nearest = np.empty(len(sample))
    for start in range(0, len(sample), BLOCK):
        rows = sample[start : start + BLOCK]
        block = vectors[rows] @ vectors.T
        block[codes[rows][:, None] == codes[None, :]] = -np.inf
        nearest[start : start + len(rows)] = block.max(axis=1)
    return nearest


def threshold(nearest_other: npt.NDArray[np.float64], ratio: float = TWIN_RATIO) -> float:
    """The similarity above which an exemplar of the same label is a twin (module docstring),
    from the sampled exemplars' similarities to their nearest exemplar of another label."""
    return float(1 - ratio * np.median(1 - nearest_other))


def leave_out(vectors: Matrix, labels: list[str], sample: npt.NDArray[np.intp], k: int) -> Twins:
    """The ``k`` nearest exemplars of each of ``sample``, leaving out it and its twins."""
    codes = _codes(labels)
    above = threshold(nearest_other_label(vectors, labels, sample))
    k = min(k, vectors.shape[0] - 1)
    counts = np.empty(len(sample), dtype=np.intp)
    indices = np.empty((len(sample), k), dtype=np.intp)
    similarities = np.empty((len(sample), k), dtype=np.float32)
    for start in range(0, len(sample), BLOCK):
        rows = sample[start : start + BLOCK]
        block = vectors[rows] @ vectors.T
        left_out = (codes[rows][:, None] == codes[None, :]) & (block > above)
        left_out[np.arange(len(rows)), rows] = True
        counts[start : start + len(rows)] = left_out.sum(axis=1) - 1
        block[left_out] = -np.inf
        end = start + len(rows)
        indices[start:end], similarities[start:end] = top_k(block, k)
    return Twins(above, counts, indices, similarities, vectors.shape[1])
