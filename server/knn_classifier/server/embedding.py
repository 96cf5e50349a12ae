"""The embedding server's client: an OpenAI-compatible ``/v1/embeddings`` endpoint (SGLang in
production), called through the openai SDK.

One call embeds a batch at the model's full width; :func:`~.vectors.truncate` then derives each
configured Matryoshka dimension (first ``d`` components, L2-normalised), which is what the
model's own ``dimensions`` option computes, so one call serves every collection.

The answer is taken raw and decoded straight into numpy (base64 rows, or float lists from
servers that ignore ``encoding_format``); see :meth:`EmbeddingClient._post` for why.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import openai

from . import deadlines
from .call_record import CallRecord
from .errors import EmbedderUnavailable, InvalidArgument, Reason, StartupError, Unavailable
from .metrics import Metrics
from .settings import EmbeddingSettings
from .vectors import Fingerprint, Matrix, check_usable

log = logging.getLogger(__name__)

_RETRYABLE_STATUS = {429, 503}
_PROBE_TEXT = "dimension probe"


class EmbeddingClient:
    """Embeds texts by calls to the embedding server (an :class:`~.vectors.Embeds`); one
    instance per service, safe for concurrent use.

    The model's full width is learned from the first answer (:meth:`probe` waits for it at
    start-up); every later answer must have that width.
    """

    def __init__(self, settings: EmbeddingSettings, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics or Metrics()
        self._client = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key.get_secret_value(),
            max_retries=0,  # retries are ours: only where they can help (see _call)
            timeout=settings.timeout_s,
        )
        self._width: int | None = None
        self._calls = CallRecord()

    @property
    def fingerprint(self) -> Fingerprint:
        known = self.known_fingerprint()
        if known is None:
            raise RuntimeError("probe() must run before the fingerprint is known")
        return known

    def known_fingerprint(self) -> Fingerprint | None:
        """The fingerprint, or None before the first answer told the width."""
        if self._width is None:
            return None
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
            return int(vectors.shape[1])

    async def embed(self, texts: Sequence[str]) -> Matrix:
        """Embeds ``texts`` (already formatted by :meth:`prompt`) at full width, in order, by
        calls of at most max_texts_per_call texts each."""
        step = self._settings.max_texts_per_call
        parts = [await self._recorded(texts[i : i + step]) for i in range(0, len(texts), step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def up(self, recent_s: float, probe_timeout_s: float) -> bool:
        """Whether the server is up, for health, telling busy from down.

        A probe queues behind the calls the server is working on, so on a server busy with
        large batches it can time out although the server works. Hence an answer to any call
        within ``recent_s`` (and no call failed since) is enough; only without one is the
        server probed, and a probe that failed while other calls are in flight, one of which
        was answered while the probe waited, means busy. A server that answers nothing, or
        whose calls fail, fails the probe with nothing answered meanwhile: down.
        """
        probed_at = time.monotonic()
        if self._calls.answered_since(probed_at - recent_s):
            return True
        if await self._ping(probe_timeout_s):
            return True
        return self._calls.in_flight > 0 and self._calls.answered_since(probed_at)

    async def _ping(self, within_s: float) -> bool:
        """Whether the server embeds a short text correctly within ``within_s``; no retries."""
        try:
            check_usable(self._decode(await self._post([_PROBE_TEXT], within_s), 1))
        except (openai.OpenAIError, Unavailable):
            return False
        self._calls.answered()
        return True

    async def close(self) -> None:
        await self._client.close()

    async def _recorded(self, texts: Sequence[str]) -> Matrix:
        """:meth:`_call`, its outcome recorded for :meth:`up`."""
        try:
            vectors = await self._call(texts)
        except EmbedderUnavailable:
            self._calls.failed()
            raise
        self._calls.answered()
        return vectors

    async def _call(self, texts: Sequence[str]) -> Matrix:
        """One call to the server, retried on 429, 503 and failed connections, never on a
        timeout: a call that timed out is still running on the server, and sending it again
        would queue a second copy of the same slow work behind it."""
        attempt = 0
        while True:
            deadlines.check("calling the embedding server")
            left = deadlines.remaining()
            timeout = (
                self._settings.timeout_s if left is None else min(self._settings.timeout_s, left)
            )
            try:
                with self._metrics.embedding_call(len(texts)):
                    body = await self._post(texts, timeout)
                vectors = self._decode(body, len(texts))
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
            except openai.APITimeoutError as exc:
                deadlines.check("the embedding server answered")
                raise EmbedderUnavailable(
                    f"the embedding server did not answer within {timeout:g}s"
                ) from exc
            except openai.APIConnectionError as exc:
                deadlines.check("the embedding server answered")
                if attempt >= self._settings.retries:
                    raise EmbedderUnavailable(
                        f"the embedding server cannot be reached ({type(exc).__name__})"
                    ) from exc
                reason = type(exc).__name__
            else:
                if self._width is None:
                    self._width = int(vectors.shape[1])
                # Checked here, before any cache sees the rows: a bad row cached would be
                # served again.
                return check_usable(vectors)
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

    async def _post(self, texts: Sequence[str], within_s: float) -> bytes:
        """The body of one ``/embeddings`` call, as it came.

        Sent with the SDK's generic ``post`` rather than ``embeddings.create``: both map HTTP
        errors and timeouts to the SDK's exceptions alike, but ``create`` walks every input
        text through its type-driven request transform and, parsed, builds a pydantic object
        per vector, which together cost more CPU than the rest of a Classify.
        """
        with self._calls.call():
            return await self._client.post(
                "/embeddings",
                cast_to=bytes,
                body={
                    "model": self._settings.model,
                    "input": list(texts),
                    "encoding_format": "base64",
                },
                options={"timeout": within_s},
            )

    def _decode(self, body: bytes, expected: int) -> Matrix:
        """The rows of an embeddings answer, in input order; EmbedderUnavailable if it is not
        one vector per text, all of one width (the model's, once known)."""
        try:
            data = json.loads(body)["data"]
            rows = [_row(item["embedding"]) for item in sorted(data, key=lambda i: i["index"])]
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise EmbedderUnavailable("the embedding server sent a malformed answer") from exc
        if len(rows) != expected:
            raise EmbedderUnavailable(
                f"the embedding server returned {len(rows)} vectors for {expected} texts"
            )
        widths = {row.shape[0] for row in rows}
        if len(widths) != 1 or (self._width is not None and widths != {self._width}):
            raise EmbedderUnavailable(
                f"the embedding server returned vectors of width {sorted(widths)}"
            )
        return np.vstack(rows)


def _row(embedding: Any) -> Matrix:
    """One vector: base64 of little-endian float32, or a list of numbers (servers that ignore
    ``encoding_format``)."""
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding, validate=True), dtype="<f4").astype(
            np.float32, copy=False
        )
    if isinstance(embedding, list) and all(isinstance(x, int | float) for x in embedding):
        return np.asarray(embedding, dtype=np.float32)
    raise TypeError(f"an embedding of type {type(embedding).__name__}")


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        detail = body.get("message") or body.get("error") or body
        if isinstance(detail, dict):
            detail = detail.get("message", detail)
        return str(detail)[:300]
    return str(exc.message)[:300]
