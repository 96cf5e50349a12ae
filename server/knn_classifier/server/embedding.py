"""Embeddings through an OpenAI-compatible ``/v1/embeddings`` endpoint (SGLang in production).

One call embeds a batch at the model's full width; :func:`truncate` then derives each configured
Matryoshka dimension (first ``d`` components, L2-normalised), which is what the model's own
``dimensions`` option computes, so one call serves every collection.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import numpy.typing as npt
import openai

from . import deadlines, tracing
from .errors import EmbedderUnavailable, InvalidArgument, Reason, StartupError, Unavailable
from .metrics import Metrics

if TYPE_CHECKING:
    from .cache import EmbeddingCache
from .settings import EmbeddingSettings

log = logging.getLogger(__name__)

Matrix = npt.NDArray[np.float32]
Send = Callable[[Sequence[str]], Awaitable[Matrix]]

_RETRYABLE_STATUS = {429, 503}
_PROBE_TEXT = "dimension probe"


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


def truncate(vectors: Matrix, dimension: int) -> Matrix:
    """The first ``dimension`` components of each row, L2-normalised (Matryoshka truncation)."""
    head = vectors[:, :dimension]
    norms = np.linalg.norm(head, axis=1, keepdims=True)
    if np.any(norms == 0.0):
        raise EmbedderUnavailable("the embedding server returned an all-zero vector")
    return cast(Matrix, (head / norms).astype(np.float32, copy=False))


class Embedder:
    """Client of the embedding server; one instance per service, safe for concurrent use."""

    def __init__(
        self,
        settings: EmbeddingSettings,
        cache: EmbeddingCache | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._settings = settings
        self._cache = cache
        self._metrics = metrics or Metrics()
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key.get_secret_value(),
            max_retries=0,  # retries are ours: only where they can help (see _call)
            timeout=settings.timeout_s,
        )
        self._width: int | None = None

    @property
    def fingerprint(self) -> Fingerprint:
        if self._width is None:
            raise RuntimeError("probe() must run before the fingerprint is known")
        return Fingerprint(self._settings.model, self._settings.template, self._width)

    def prompt(self, instruction: str, text: str) -> str:
        """The text as the model sees it: the template filled with the classifier's instruction."""
        return self._settings.template.format(instruction=instruction, text=text)

    async def probe(self) -> int:
        """Learns the model's full width, waiting up to ``startup_timeout_s`` for the server."""
        deadline = time.monotonic() + self._settings.startup_timeout_s
        while True:
            try:
                vectors = await self.embed([_PROBE_TEXT])
            except Unavailable as exc:
                if time.monotonic() >= deadline:
                    raise StartupError(
                        f"the embedding server at {self._settings.base_url} did not answer "
                        f"within {self._settings.startup_timeout_s:g}s ({exc}); start it or set "
                        "KNN_EMBEDDING__BASE_URL"
                    ) from exc
                log.info("waiting for the embedding server: %s", exc)
                await asyncio.sleep(1.0)
                continue
            except InvalidArgument as exc:
                raise StartupError(
                    f"the embedding server rejected the probe call ({exc}); check "
                    "KNN_EMBEDDING__MODEL"
                ) from exc
            self._width = int(vectors.shape[1])
            if self._cache is not None:
                self._cache.bind(self.fingerprint)
            return self._width

    @tracing.traced("embed")
    async def embed(self, texts: Sequence[str], send: Send | None = None) -> Matrix:
        """Embeds ``texts`` (already formatted by :meth:`prompt`) at full width, in order.

        Texts the cache knows are not sent; a batch that is all hits makes no call. The others
        go to ``send`` (default :meth:`embed_uncached`; the service passes its coalescer).
        """
        tracing.annotate(texts=len(texts))
        send = send or self.embed_uncached
        if self._cache is None or self._width is None:
            return await send(texts)
        cached = self._cache.get_many(texts)
        missing = list(dict.fromkeys(t for t, v in zip(texts, cached, strict=True) if v is None))
        if not missing:
            return np.vstack(cached)  # type: ignore[arg-type]
        fresh = await send(missing)
        self._cache.put_many(missing, fresh)
        by_text = dict(zip(missing, fresh, strict=True))
        return np.vstack(
            [by_text[t] if v is None else v for t, v in zip(texts, cached, strict=True)]
        )

    async def embed_uncached(self, texts: Sequence[str]) -> Matrix:
        """Embeds ``texts`` by calls to the server (of at most max_texts_per_call texts each)."""
        step = self._settings.max_texts_per_call
        parts = [await self._call(texts[i : i + step]) for i in range(0, len(texts), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def ping(self, within_s: float) -> bool:
        """Whether the server embeds a short text correctly within ``within_s``; no retries."""
        try:
            response = await self._client.embeddings.create(
                model=self._settings.model,
                input=[_PROBE_TEXT],
                encoding_format="base64",
                timeout=within_s,
            )
            self._decode(response, 1)
        except (openai.OpenAIError, Unavailable, ValueError, TypeError):
            return False
        return True

    async def close(self) -> None:
        await self._client.close()
        if self._cache is not None:
            self._cache.close()

    async def _call(self, texts: Sequence[str]) -> Matrix:
        attempt = 0
        while True:
            deadlines.check("calling the embedding server")
            left = deadlines.remaining()
            timeout = (
                self._settings.timeout_s if left is None else min(self._settings.timeout_s, left)
            )
            try:
                with self._metrics.embedding_call(len(texts)):
                    response = await self._client.embeddings.create(
                        model=self._settings.model,
                        input=list(texts),
                        encoding_format="base64",
                        timeout=timeout,
                    )
                return self._decode(response, len(texts))
            except openai.BadRequestError as exc:
                raise InvalidArgument(
                    f"the embedding model rejected the input: {_message(exc)}",
                    reason=Reason.INPUT_REJECTED_BY_MODEL,
                ) from exc
            except openai.APIStatusError as exc:
                if exc.status_code not in _RETRYABLE_STATUS or attempt >= self._settings.retries:
                    raise EmbedderUnavailable(
                        f"the embedding server answered HTTP {exc.status_code}"
                    ) from exc
                reason = f"HTTP {exc.status_code}"
            except openai.APIConnectionError as exc:  # includes timeouts
                deadlines.check("the embedding server answered")
                if attempt >= self._settings.retries:
                    raise EmbedderUnavailable(
                        f"the embedding server cannot be reached ({type(exc).__name__})"
                    ) from exc
                reason = type(exc).__name__
            except (openai.APIResponseValidationError, ValueError, TypeError) as exc:
                raise EmbedderUnavailable("the embedding server sent a malformed answer") from exc
            delay = 0.1 * 2**attempt * (1.0 + random.random())
            left = deadlines.remaining()
            if left is not None and delay >= left:
                raise EmbedderUnavailable(
                    f"the embedding server failed ({reason}); no time left to retry"
                )
            log.warning("embedding call failed (%s); retry %d in %.2fs", reason, attempt + 1, delay)
            self._metrics.embedding_retries.labels(reason).inc()
            await asyncio.sleep(delay)
            attempt += 1

    def _decode(self, response: openai.types.CreateEmbeddingResponse, expected: int) -> Matrix:
        if len(response.data) != expected:
            raise EmbedderUnavailable(
                f"the embedding server returned {len(response.data)} vectors for {expected} texts"
            )
        rows = [
            np.frombuffer(base64.b64decode(cast(str, item.embedding)), dtype="<f4")
            for item in sorted(response.data, key=lambda item: item.index)
        ]
        widths = {row.shape[0] for row in rows}
        if len(widths) != 1 or (self._width is not None and widths != {self._width}):
            raise EmbedderUnavailable(
                f"the embedding server returned vectors of width {sorted(widths)}"
            )
        matrix = np.vstack(rows).astype(np.float32, copy=False)
        # Checked here, before any cache sees the rows: a bad row cached would be served again.
        if not np.all(usable_rows(matrix)):
            raise EmbedderUnavailable(
                "the embedding server returned an all-zero or non-finite vector; retry later, "
                "and check the embedding server if it persists"
            )
        return matrix


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        detail = body.get("message") or body.get("error") or body
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:300]
    return str(exc.message)[:300]
