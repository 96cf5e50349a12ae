"""Idempotent creation: whether an existing classifier has the settings a create asked for."""

from __future__ import annotations

from typing import Literal

from knn_classifier.v1 import classifier_pb2 as pb

from ._errors import SettingsMismatchError
from ._requests import voting_name

_NUMBERS: tuple[Literal["k", "min_similarity", "min_confidence", "temperature"], ...] = (
    "k",
    "min_similarity",
    "min_confidence",
    "temperature",
)


def differences(request: pb.CreateClassifierRequest, existing: pb.Classifier) -> list[str]:
    """Each setting the request gives that ``existing`` has otherwise ("k is 10, not 5").

    A setting the request leaves to the server's default matches whatever the classifier has:
    the client cannot know the server's defaults, and "create it if it is not there" means
    exactly that.
    """
    found = []
    if request.instruction and request.instruction != existing.instruction:
        found.append(f"instruction is {existing.instruction!r}, not {request.instruction!r}")
    if request.voting != pb.VOTING_UNSPECIFIED and request.voting != existing.voting:
        found.append(f"voting is {voting_name(existing.voting)}, not {voting_name(request.voting)}")
    for field in _NUMBERS:
        # Both are float32 or uint32 fields, so equal settings compare equal exactly.
        wanted, actual = getattr(request, field), getattr(existing, field)
        if request.HasField(field) and wanted != actual:
            found.append(f"{field} is {actual:g}, not {wanted:g}")
    if request.HasField("dimension") and request.dimension != existing.dimension:
        found.append(f"dimension is {existing.dimension}, not {request.dimension}")
    return found


def matching(request: pb.CreateClassifierRequest, existing: pb.Classifier) -> pb.Classifier:
    """``existing`` if it has the settings ``request`` gives, else SettingsMismatchError."""
    found = differences(request, existing)
    if found:
        raise SettingsMismatchError(existing, found)
    return existing
