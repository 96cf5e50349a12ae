"""Results of the exemplar writes: what they returned before, plus the classifier's new etag;
the results of ClassifyBatch with the etag of the classifier that answered; and the label
counts of ListLabels with the etag they were read at.

``add_exemplars`` returned the ids as a list and ``delete_exemplars`` the count as an int; both
still do (these are a ``list`` and an ``int``), and carry the etag the server answered after
the write, so that a caller can chain conditional writes without reading the classifier again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Self

from knn_classifier.v1 import classifier_pb2 as pb

from ._errors import KnnClassifierError


class AddedExemplars(list[str]):
    """The ids of the added exemplars, in request order; ``etag``: the classifier's after it."""

    def __init__(self, ids: Iterable[str], etag: str) -> None:
        super().__init__(ids)
        self.etag = etag


class DeletedExemplars(int):
    """How many exemplars were deleted; ``etag``: the classifier's after the delete."""

    etag: str

    def __new__(cls, deleted: int, etag: str) -> Self:
        result = super().__new__(cls, deleted)
        result.etag = etag
        return result


class ClassifiedBatch(list[pb.Prediction | KnnClassifierError]):
    """One result per text, in order; ``etag``: the classifier's revision that answered."""

    def __init__(self, results: Iterable[pb.Prediction | KnnClassifierError], etag: str) -> None:
        super().__init__(results)
        self.etag = etag


class LabelCounts(dict[str, int]):
    """Label -> number of exemplars, most exemplars first; ``etag``: the classifier's when the
    first page was read (a write during the listing changes it, so a write conditional on it
    fails rather than act on counts read across a change)."""

    def __init__(self, counts: Iterable[tuple[str, int]], etag: str) -> None:
        super().__init__(counts)
        self.etag = etag

    @classmethod
    def of(cls, pages: list[pb.ListLabelsResponse]) -> LabelCounts:
        """The counts of every page of one listing (at least one page)."""
        counts = ((item.label, item.count) for page in pages for item in page.labels)
        return cls(counts, pages[0].etag)
