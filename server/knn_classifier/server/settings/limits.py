"""Request limits (``KNN_LIMITS__*``) and the defaults of new classifiers
(``KNN_DEFAULTS__*``), which must lie within them."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, Field

from ..voting import Voting


class LimitSettings(BaseModel):
    """Every bound on requests: the fields are configurable, the class variables fixed.

    A request over a bound is refused with INVALID_ARGUMENT; over the bounds on load and
    capacity (max_queued_texts, max_concurrent_rpcs, max_exemplars_per_classifier,
    max_request_bytes, max_response_bytes) with RESOURCE_EXHAUSTED, as their descriptions say.
    """

    max_label_chars: ClassVar[int] = 256
    max_id_chars: ClassVar[int] = 128
    max_instruction_chars: ClassVar[int] = 2048
    max_metadata_entries: ClassVar[int] = 32
    max_metadata_chars: ClassVar[int] = 1024
    """Characters of one metadata key or value."""
    max_temperature: ClassVar[float] = 10.0

    max_text_chars: int = Field(8192, ge=1, description="Characters per text.")
    max_batch_size: int = Field(
        1024, ge=1, description="Texts per ClassifyBatch, exemplars per AddExemplars."
    )
    max_k: int = Field(200, ge=1, description="Largest k a request may ask for.")
    max_batch_neighbours: int = Field(
        51_200,
        ge=1,
        description="Texts x k one Classify or ClassifyBatch call may ask for (e.g. 256 texts "
        "at k=200); bounds the work and memory of one call.",
    )
    max_page_size: int = Field(
        1000, ge=1, description="Largest page of a list; larger page sizes are reduced to it."
    )
    max_sweep: int = Field(64, ge=1, description="Settings one Evaluate call may sweep.")
    max_evaluated: int = Field(
        5000,
        ge=1,
        description=(
            "Texts one Evaluate call classifies: held-out texts beyond it are refused; "
            "leave-one-out classifies a fixed random sample of this many exemplars."
        ),
    )
    max_queued_texts: int = Field(
        8192, ge=1, description="Texts waiting for an embedding call; more: RESOURCE_EXHAUSTED."
    )
    max_exemplars_per_classifier: int = Field(
        1_000_000, ge=1, description="Exemplars one classifier may hold; more: RESOURCE_EXHAUSTED."
    )
    max_concurrent_rpcs: int = Field(
        1000, ge=1, description="Calls served at once; more get RESOURCE_EXHAUSTED."
    )
    max_request_bytes: int = Field(
        32 * 1024 * 1024,
        ge=1024,
        le=2**31 - 1,
        description="Largest request message received (a full AddExemplars batch of long texts "
        "needs more than 4 MiB); larger: RESOURCE_EXHAUSTED. Also the hard cap on any response.",
    )
    max_response_bytes: int = Field(
        4 * 1024 * 1024 - 64 * 1024,
        ge=1024,
        le=2**31 - 1,
        description="List and batch responses stay under this size: a page holds fewer items, "
        "a ClassifyBatch or Classify that cannot fit is refused with RESOURCE_EXHAUSTED, an "
        "Evaluate leaves out the per-label metrics of its last settings. Below the 4 MiB that "
        "stock gRPC clients accept.",
    )


class ClassifierDefaults(BaseModel):
    """Defaults a new classifier takes when CreateClassifier leaves them unset."""

    instruction: str = Field(
        "Classify the given text into one of the known categories",
        description="Instruction given to the model with every text.",
    )
    k: int = Field(10, ge=1, description="Neighbours that vote.")
    voting: Voting = Field(Voting.SIMILARITY_WEIGHTED, description=f"One of {', '.join(Voting)}.")
    temperature: float = Field(
        0.05,
        gt=0,
        le=LimitSettings.max_temperature,
        description="Softmax, centroid and discriminant voting's temperature (score scale).",
    )
    min_similarity: float = Field(
        0.0,
        ge=-1,
        le=1,
        description="Neighbours less similar than this do not vote; if none is left: unknown.",
    )
    min_confidence: float = Field(
        0.0, ge=0, le=1, description="Below this winning share of the vote the answer is unknown."
    )
