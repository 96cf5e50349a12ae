"""The neighbours and label scores of evaluated texts, from the stored vectors.

Leave-one-out classifies every stored exemplar by the others, from the stored vectors; held-out
evaluation classifies labelled texts that are not stored. Both vote over exact cosine neighbours
(the stores search exactly too), so what Evaluate measures is what Classify answers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from .. import deadlines, label_models, negatives
from ..store import Store
from ..vectors import Matrix
from ..voting import Voting

BLOCK = 1024
"""Query rows scored at a time, which bounds the memory of a block of similarities."""


@dataclass(frozen=True, slots=True)
class Exemplars:
    """One classifier's stored in-scope exemplars in one dimension, and the vectors of its
    negative exemplars apart (they are in no label, and only veto: :mod:`negatives`)."""

    ids: list[str]
    labels: list[str]
    texts: list[str]
    vectors: Matrix
    negatives: Matrix = field(default_factory=lambda: np.empty((0, 0), dtype=np.float32))

    def vetoed(self, queries: Matrix, top_similarity: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Which ``queries`` the negatives veto, given each one's nearest in-scope similarity."""
        nearest_negative = negatives.nearest_similarity(queries, self.negatives)
        return negatives.veto_mask(top_similarity, nearest_negative)

    def vetoed_left_out(self, sample: npt.NDArray[np.intp]) -> npt.NDArray[np.bool_]:
        """Which exemplars of ``sample`` the negatives veto in leave-one-out."""
        if not len(self.negatives):
            return np.zeros(len(sample), dtype=bool)
        queries = self.vectors[sample]
        _, similarities = nearest(queries, self.vectors, 1, sample)
        return self.vetoed(queries, similarities[:, 0])


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
        end = start + block.shape[0]
        indices[start:end], similarities[start:end] = top_k(block, k)
    return indices, similarities


def top_k(block: Matrix, k: int) -> tuple[npt.NDArray[np.intp], Matrix]:
    """The columns of each row's ``k`` largest values of ``block``, and the values, best first."""
    top = np.argpartition(-block, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(block, top, axis=1)
    order = np.argsort(-top_sims, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(top_sims, order, axis=1)


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
    negative = np.asarray([r.payload["out_of_scope"] for r in records], dtype=bool)
    rows = np.flatnonzero(~negative)
    return Exemplars(
        ids=[str(records[i].payload["id"]) for i in rows],
        labels=[str(records[i].payload["label"]) for i in rows],
        texts=[str(records[i].payload["text"]) for i in rows],
        vectors=vectors if not negative.any() else vectors[rows],
        negatives=vectors[negative],
    )
