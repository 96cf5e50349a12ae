"""Negative exemplars: examples of texts a classifier should answer "unknown" to.

A negative exemplar is stored like any exemplar, flagged ``out_of_scope``, and belongs to no
label: it never votes and is in no label statistic (label models, calibration, the open-set
model). Its one effect is the **veto**: a text whose nearest negative is at least as similar as
its nearest in-scope exemplar is answered unknown (``OUT_OF_SCOPE``), with that negative first
among the neighbours as the reason. docs/accuracy.md ("Negative exemplars") measured the veto
against two scores that weigh the negatives in, and recommends it: it rejects most texts of the
topics the negatives cover and is the simplest to explain.

Evaluate applies the same rule to its leave-one-out and held-out texts, and fits the
out-of-scope threshold with the vetoed in-scope exemplars counted as rejected.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import numpy.typing as npt

from .vectors import Matrix
from .voting import Neighbour, UnknownReason, Vote


def vetoed(answer: Vote, nearest_negative: Neighbour | None) -> Vote:
    """``answer``, unknown as out of scope if ``nearest_negative`` is at least as similar as
    the nearest in-scope exemplar (``answer.top_similarity``); the negative then leads the
    neighbours."""
    if nearest_negative is None or nearest_negative.similarity < answer.top_similarity:
        return answer
    return dataclasses.replace(
        answer,
        label=None,
        unknown_reason=UnknownReason.OUT_OF_SCOPE,
        voters=[nearest_negative, *answer.voters],
    )


def veto_mask(top_in_scope: npt.ArrayLike, top_negative: npt.ArrayLike) -> npt.NDArray[np.bool_]:
    """Which texts the veto answers unknown, from each one's nearest in-scope and nearest
    negative similarities."""
    return np.asarray(top_negative) >= np.asarray(top_in_scope)


def nearest_similarity(queries: Matrix, negatives: Matrix) -> npt.NDArray[np.float32]:
    """Each query's similarity to its nearest negative; -inf with none (nothing is vetoed)."""
    if not len(negatives):
        return np.full(len(queries), -np.inf, dtype=np.float32)
    return np.asarray((queries @ negatives.T).max(axis=1), dtype=np.float32)
