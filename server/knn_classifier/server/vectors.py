"""Vectors and the one interface every embedding layer offers.

A leaf module: it imports nothing of the service but its domain errors, so the embedding client,
the coalescer, the cache, the stores and the models all share these definitions without
importing each other.
"""

from __future__ import annotations

from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import numpy.typing as npt

from .errors import EmbedderUnavailable

Matrix = npt.NDArray[np.float32]


class Embeds(Protocol):
    """Something that embeds texts: the HTTP client, or a layer wrapping another ``Embeds``.

    ``embed`` returns one full-width row per text, in order, every row usable (see
    :func:`usable_rows`), or raises the service's errors (InvalidArgument when the model rejects
    the input, Unavailable when it cannot answer).
    """

    def embed(self, texts: Sequence[str]) -> Awaitable[Matrix]: ...


@dataclass(frozen=True)
class Fingerprint:
    """What makes two vectors comparable: the same model, prompt template and width."""

    model: str
    template: str
    width: int

    def as_payload(self) -> dict[str, str | int]:
        return {"model": self.model, "template": self.template, "width": self.width}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> Fingerprint:
        return cls(str(payload["model"]), str(payload["template"]), int(payload["width"]))


class UnusableVectors(EmbedderUnavailable):
    """The embedding server answered, but some rows cannot serve as embeddings.

    Carries the whole answer, so a layer that shares one call among several callers can give
    the callers whose rows are all usable their vectors and fail only the others.
    """

    def __init__(self, vectors: Matrix) -> None:
        super().__init__(
            "the embedding server returned an all-zero or non-finite vector; retry later, "
            "and check the embedding server if it persists"
        )
        self.vectors = vectors


def usable_rows(vectors: Matrix) -> npt.NDArray[np.bool_]:
    """Which rows can serve as embeddings: those with a finite, non-zero norm.

    A row with a NaN or an infinity has no finite norm, and an all-zero row cannot be
    normalised: such a row is a fault of the embedding server, never the meaning of a text.
    Computed in float32 like :func:`truncate`'s norms, so magnitudes that it could not
    normalise fail too.
    """
    with np.errstate(over="ignore"):
        squares = np.einsum("ij,ij->i", vectors, vectors)
    return cast(npt.NDArray[np.bool_], np.isfinite(squares) & (squares > 0))


def check_usable(vectors: Matrix) -> Matrix:
    """``vectors`` if every row is usable, else :class:`UnusableVectors`."""
    if not np.all(usable_rows(vectors)):
        raise UnusableVectors(vectors)
    return vectors


def truncate(vectors: Matrix, dimension: int) -> Matrix:
    """The first ``dimension`` components of each row, L2-normalised (Matryoshka truncation)."""
    head = vectors[:, :dimension]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    if np.any(norms == 0.0):
        raise EmbedderUnavailable("the embedding server returned an all-zero vector")
    return cast(Matrix, (head / norms).astype(np.float32, copy=False))
