"""Classify and ClassifyBatch: validate, embed once, query the neighbours, vote.

A call reads the classifier's record once, at its start: its settings, and its revision, which
keys the label models (:mod:`derived`). Reading it on every call, rather than caching it for a
while, is what makes a write acknowledged by any replica change the next answer of every
replica (docs/design.md, "Derived models and replicas"); it costs one point lookup in the
store's meta collection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np

from . import errors, label_models, negatives, open_set, out_of_scope, tracing, validation
from .classifiers import Classifiers
from .coalescing import QueryBatcher
from .derived import ExemplarModels
from .domain import ClassifierConfig, ClassifyOptions, either
from .embedding_pipeline import EmbeddingPipeline
from .errors import FailedPrecondition, InvalidArgument, Reason
from .settings import LimitSettings
from .store import Record
from .vectors import Embeds, Matrix, truncate
from .voting import Neighbour, ScopeCheck, Vote, vote


class Classification:
    def __init__(
        self,
        limits: LimitSettings,
        dimensions: Sequence[int],
        embedder: EmbeddingPipeline,
        classifiers: Classifiers,
        queries: QueryBatcher,
        models: ExemplarModels,
    ) -> None:
        self._limits = limits
        self._dimensions = list(dimensions)
        self._embedder = embedder
        self._classifiers = classifiers
        self._queries = queries
        self._models = models

    async def classify(
        self, classifier: str, texts: Sequence[str], options: ClassifyOptions
    ) -> tuple[list[Vote | InvalidArgument], str]:
        """Classifies ``texts`` with one embedding call and one batched store query; returns
        the answers and the etag of the classifier's record they were given with.

        A text that is invalid, or that the embedding model rejects, gets its InvalidArgument in
        its slot instead of a vote, and the others are classified; any other failure fails the
        whole call.
        """
        validation.batch_size(len(texts), self._limits, "texts")
        config = await self._classifiers.get(classifier)
        k = validation.k(either(options.k, config.k), self._limits, "options.k")
        validation.neighbours(len(texts), k, self._limits)
        dimension = validation.dimension(
            either(options.dimension, config.dimension or self._dimensions[-1]),
            self._dimensions,
            "options.dimension",
        )
        voting = options.voting or config.voting
        temperature = validation.temperature(
            either(options.temperature, config.temperature), "options.temperature"
        )
        min_similarity = validation.fraction(
            either(options.min_similarity, config.min_similarity), "options.min_similarity", -1, 1
        )
        min_confidence = validation.fraction(
            either(options.min_confidence, config.min_confidence), "options.min_confidence", 0, 1
        )
        # The calibration was fitted for the classifier's own settings; others get raw shares.
        # Temperatures as the wire carries them (float32): the classifier's own, sent back,
        # must count as its own.
        own = (
            config.k,
            config.voting,
            config.dimension or self._dimensions[-1],
            np.float32(config.temperature),
        )
        asked = (k, voting, dimension, np.float32(temperature))
        calibration = config.calibration if asked == own else None

        answers: list[Vote | InvalidArgument | None] = [None] * len(texts)
        valid: list[int] = []
        for i, text in enumerate(texts):
            try:
                validation.text(text, self._limits, _text_field(i, len(texts)))
                valid.append(i)
            except InvalidArgument as invalid:
                answers[i] = invalid
        prompts = [self._embedder.prompt(config.instruction, texts[i]) for i in valid]
        embedded, vectors, rejected = await embed_isolating_rejects(
            self._embedder.classify, prompts
        )
        for j, rejection in rejected.items():
            i = valid[j]
            answers[i] = InvalidArgument(
                rejection.message, reason=rejection.reason, field=_text_field(i, len(texts))
            )
        if embedded:
            queries = truncate(vectors, dimension)
            searched = max(k, _scope_neighbours(config, dimension))
            results, nearest_negatives = await self._neighbours(
                config, dimension, queries, searched
            )
            if not results[0]:
                raise _no_exemplars(classifier)
            with tracing.span("vote"):
                tracing.annotate(voting=voting.value, texts=len(results))
                labels: list[str] = []
                by_label = np.empty((len(queries), 0), dtype=np.float32)
                if voting in label_models.FIT:
                    fit = label_models.FIT[voting]
                    model = await self._models.get(
                        config, dimension, f"label-model:{fit.__name__}", fit
                    )
                    if not model.labels:  # every exemplar was deleted since the neighbour query
                        raise _no_exemplars(classifier)
                    labels, by_label = model.labels, model.scores(queries)
                checks = await self._scope_checks(config, dimension, queries, results)
                for j, hits in enumerate(results):
                    neighbours = [_neighbour(hit) for hit in hits[:k]]
                    answer = vote(
                        neighbours,
                        voting,
                        min_similarity,
                        min_confidence,
                        temperature,
                        calibration,
                        list(zip(labels, by_label[j].tolist(), strict=True)),
                        config.label_temperature,
                    )
                    if checks:
                        answer = out_of_scope.judged(answer, checks[j])
                    if nearest_negatives:
                        answer = negatives.vetoed(answer, nearest_negatives[j])
                    answers[valid[embedded[j]]] = answer
        return [a for a in answers if a is not None], config.etag

    async def _neighbours(
        self, config: ClassifierConfig, dimension: int, queries: Matrix, k: int
    ) -> tuple[list[list[Record]], list[Neighbour | None]]:
        """Each query's ``k`` nearest in-scope exemplars and its nearest negative exemplar
        (:mod:`negatives`). A classifier never marked as holding negatives costs one
        unfiltered query, as before negatives existed; one marked costs a second query, of one
        neighbour among its negatives, made at the same time.

        An unmarked classifier's answer that holds a negative anyway (one was added after
        this call read the record, or another replica's delete cleared the mark meanwhile) is
        asked again as a marked one's: a negative never votes."""
        if not config.holds_negatives:
            results = await self._queries.query(dimension, config.name, queries, k)
            if not any(hit.payload["out_of_scope"] for hits in results for hit in hits):
                return results, []
        in_scope, negative = await asyncio.gather(
            self._queries.query(dimension, config.name, queries, k, out_of_scope=False),
            self._queries.query(dimension, config.name, queries, 1, out_of_scope=True),
        )
        return in_scope, [_neighbour(hits[0]) if hits else None for hits in negative]

    async def _scope_checks(
        self,
        config: ClassifierConfig,
        dimension: int,
        queries: Matrix,
        results: Sequence[Sequence[Record]],
    ) -> list[ScopeCheck]:
        """Each query's out-of-scope check, if the classifier has a rule for ``dimension``."""
        rule = config.out_of_scope
        if rule is None or rule.dimension != dimension:
            return []
        model = await self._models.get(config, dimension, "out-of-scope", out_of_scope.model_fit)
        if model is None:
            return []
        scores = out_of_scope.scores(
            model,
            rule,
            queries,
            [hits[0].score for hits in results],
            [[hit.payload["label"] for hit in hits] for hits in results],
        )
        return [ScopeCheck(s, rule.threshold, rule.target_coverage) for s in scores.tolist()]


def _scope_neighbours(config: ClassifierConfig, dimension: int) -> int:
    """Neighbours the out-of-scope check of ``dimension`` needs (0 without a rule for it)."""
    rule = config.out_of_scope
    return open_set.AGREEMENT_NEIGHBOURS if rule and rule.dimension == dimension else 0


async def embed_isolating_rejects(
    embedder: Embeds, prompts: Sequence[str]
) -> tuple[list[int], Matrix, dict[int, InvalidArgument]]:
    """Embeds ``prompts`` together; if the model rejects the batch, finds the culprits.

    Returns the positions embedded, their vectors (row i for position i of the list) and the
    rejection of each other position. SGLang rejects a whole batch for one bad text, so a
    rejected batch is retried one text per call.
    """
    if not prompts:
        return [], np.empty((0, 0), dtype=np.float32), {}
    try:
        every = await embedder.embed(prompts)
        return list(range(len(prompts))), every, {}
    except InvalidArgument as whole:
        if len(prompts) == 1:
            return [], np.empty((0, 0), dtype=np.float32), {0: whole}
    rows: dict[int, Matrix] = {}
    rejected: dict[int, InvalidArgument] = {}
    for j, prompt in enumerate(prompts):
        try:
            rows[j] = await embedder.embed([prompt])
        except InvalidArgument as one:
            rejected[j] = one
    embedded = sorted(rows)
    vectors = np.vstack([rows[j] for j in embedded]) if embedded else np.empty((0, 0))
    return embedded, vectors.astype(np.float32, copy=False), rejected


def _no_exemplars(classifier: str) -> FailedPrecondition:
    return FailedPrecondition(
        f"classifier {classifier!r} has no exemplars with a label (out-of-scope examples "
        "alone cannot classify); add some with AddExemplars",
        reason=Reason.CLASSIFIER_EMPTY,
        resource=errors.classifier(classifier),
    )


def _text_field(i: int, count: int) -> str:
    """The request field of text ``i``: Classify's ``text``, or ClassifyBatch's ``texts[i]``."""
    return "text" if count == 1 else f"texts[{i}]"


def _neighbour(record: Record) -> Neighbour:
    payload = record.payload
    return Neighbour(
        payload["id"], payload["label"], payload["text"], record.score, payload["out_of_scope"]
    )
