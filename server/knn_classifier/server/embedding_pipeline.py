"""The embedding layers as the service uses them, composed once (see ``app.build_embedding``).

Two paths end at the one client and share one cache:

- ``classify``: cache, then the coalescer, then the client. Classify's requests are small and
  many; the coalescer merges them into few calls and bounds the calls in flight.
- ``bulk``: cache, then the client. AddExemplars, the migration's restore, Evaluate's held-out
  texts and the start-up repair send large batches, one caller at a time per request: through
  the coalescer they would take its bounded queue (a legal batch could be refused as a full
  queue) and hold Classify's small requests behind them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from . import tracing
from .cache import EmbeddingCache
from .coalescing import Coalescer
from .embedding import EmbeddingClient
from .vectors import Embeds, Fingerprint, Matrix


class TracedEmbeddings:
    """The outermost layer of a path: an ``embed`` span in the caller's trace.

    Inner layers may run elsewhere (the coalescer's calls serve many callers, outside any one
    caller's trace), so the span is made here, where the request waits.
    """

    def __init__(self, inner: Embeds) -> None:
        self._inner = inner

    @tracing.traced("embed")
    async def embed(self, texts: Sequence[str]) -> Matrix:
        tracing.annotate(texts=len(texts))
        return await self._inner.embed(texts)


@dataclass(frozen=True)
class EmbeddingPipeline:
    client: EmbeddingClient
    classify: Embeds
    bulk: Embeds
    coalescer: Coalescer | None = None
    cache: EmbeddingCache | None = None

    @classmethod
    def direct(cls, client: EmbeddingClient) -> EmbeddingPipeline:
        """Both paths straight to ``client``: no coalescer, no cache."""
        traced = TracedEmbeddings(client)
        return cls(client, traced, traced)

    @property
    def fingerprint(self) -> Fingerprint:
        return self.client.fingerprint

    def prompt(self, instruction: str, text: str) -> str:
        return self.client.prompt(instruction, text)

    async def up(self, recent_s: float, probe_timeout_s: float) -> bool:
        return await self.client.up(recent_s, probe_timeout_s)

    async def close(self) -> None:
        if self.coalescer is not None:
            await self.coalescer.close()
        await self.client.close()
        if self.cache is not None:
            self.cache.close()
