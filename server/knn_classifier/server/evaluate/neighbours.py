"""The neighbours and label scores of evaluated texts, from the stored vectors.

Leave-one-out classifies every stored exemplar by the others, from the stored vectors; held-out
evaluation classifies labelled texts that are not stored. Both vote over exact cosine neighbours
(the stores search exactly too), so what Evaluate measures is what Classify answers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .. import deadlines, label_models
from ..store import Store
from ..vectors import Matrix
from ..voting import Voting

BLOCK = 1024
"""Query rows scored at a time, which bounds the memory of a block of similarities."""


@dataclass(frozen=True, slots=True)
class Exemplars:
    """One classifier's stored exemplars in one dimension."""

    ids: list[str]
    labels: list[str]
    texts: list[str]
    vectors: Matrix


def nearest(
    queries: Matrix, base: Matrix, k: int, self_index: npt.NDArray[np.intp] | None = None
) -> tuple[npt.NDArray[np.intp], Matrix]:
    """Indices and similarities of the ``k`` most similar rows of ``base``, best first.

    With ``self_index`` (leave-one-out), query i is row ``self_index[i]`` of ``base`` and never
    finds itself.
    """
    k = min(k, base.shape[0] - (0 if self_index is None else 1))
    indices = np.empty((queries.shape[0], k), dtype=np.intp)
    similarities = np.empty((queries.shape[0], k), dtype=np.float32)
    for start in range(0, queries.shape[0], BLOCK):
        block = queries[start : start + BLOCK] @ base.T
        if self_index is not None:
            rows = np.arange(block.shape[0])
            block[rows, self_index[start : start + block.shape[0]]] = -np.inf
        top = np.argpartition(-block, k - 1, axis=1)[:, :k]
        top_sims = np.take_along_axis(block, top, axis=1)
        order = np.argsort(-top_sims, axis=1, kind="stable")
        indices[start : start + block.shape[0]] = np.take_along_axis(top, order, axis=1)
        similarities[start : start + block.shape[0]] = np.take_along_axis(top_sims, order, axis=1)
    return indices, similarities


def label_scores(
    voting: Voting,
    exemplars: Exemplars,
    queries: Matrix,
    self_index: npt.NDArray[np.intp] | None = None,
) -> tuple[list[str], Matrix]:
    """The labels and each query's score for each label under centroid or discriminant voting;
    with ``self_index`` (leave-one-out), exemplar ``self_index[i]`` is query i and is left out
    of every statistic it would be in (:mod:`label_models`), and the call's deadline is checked
    as it goes."""
    if self_index is not None:
        return label_models.LEAVE_ONE_OUT[voting](
            exemplars.labels,
            exemplars.vectors,
            self_index,
            lambda: deadlines.check(f"the next rows of {voting} leave-one-out"),
        )
    model = label_models.FIT[voting](exemplars.labels, exemplars.vectors)
    return model.labels, model.scores(queries)


async def stored_exemplars(store: Store, classifier: str, dimension: int) -> Exemplars:
    """``classifier``'s exemplars and their vectors in ``dimension``, as the store holds them."""
    records, vectors = await store.vectors(dimension, classifier)
    return Exemplars(
        ids=[str(r.payload["id"]) for r in records],
        labels=[str(r.payload["label"]) for r in records],
        texts=[str(r.payload["text"]) for r in records],
        vectors=vectors,
    )
