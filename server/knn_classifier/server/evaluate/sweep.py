"""Evaluate: a classifier measured over a sweep of settings, and the best applied to it.

Leave-one-out classifies stored exemplars by the others from their stored vectors, by default
with each one's near-duplicates left out with it (:mod:`.twins`); held-out evaluation embeds
labelled texts that are not stored. Neighbours come from
:func:`~knn_classifier.server.evaluate.neighbours.nearest` and votes from the same function
Classify uses.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterable, Sequence
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from .. import deadlines, label_models, open_set, out_of_scope, validation
from ..domain import ClassifierConfig, EvaluateRequest
from ..embedding_pipeline import EmbeddingPipeline
from ..errors import FailedPrecondition, InvalidArgument
from ..out_of_scope import OutOfScopeFit
from ..settings import Settings
from ..store import Store
from ..thresholds import Reached
from ..vectors import Matrix, truncate
from ..voting import LABEL_SCORED, Voting
from . import choice, metrics, neighbours, twins, votes
from .choice import Evaluated, cross_fitted, recommended_first, with_fitted_temperature
from .metrics import Report, Scope
from .neighbours import Exemplars, stored_exemplars
from .votes import Outcome, Setting

_TEMPERED = {Voting.SOFTMAX, Voting.MIXTURE, *LABEL_SCORED}
"""The voting methods that use a temperature."""


T = TypeVar("T")


def _distinct(values: Iterable[T]) -> list[T]:
    """``values`` without repeats, in first-seen order."""
    return list(dict.fromkeys(values))


def _rule_for(config: ClassifierConfig, dimension: int) -> OutOfScopeFit | None:
    """The classifier's out-of-scope rule if it was fitted in ``dimension``."""
    rule = config.out_of_scope
    return rule if rule is not None and rule.dimension == dimension else None


async def _fitted_rule(
    exemplars: Exemplars, sample: npt.NDArray[np.intp], target_coverage: float
) -> OutOfScopeFit | None:
    """The out-of-scope rule apply_best fits from the leave-one-out of ``sample``, the
    exemplars vetoed by a negative counted as rejected."""
    vetoed = await asyncio.to_thread(exemplars.vetoed_left_out, sample)
    return await asyncio.to_thread(
        out_of_scope.fit,
        exemplars.labels,
        exemplars.vectors,
        sample,
        exemplars.vectors.shape[1],
        target_coverage,
        lambda: deadlines.check("the next rows of the out-of-scope fit"),
        vetoed,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Evaluation:
    reports: list[Report]
    """One per setting of the sweep, the recommended one first."""
    unknown_labels: list[str]
    """Held-out labels the classifier has no exemplars of."""
    exemplar_count: int
    updated: ClassifierConfig | None
    """With apply_best: the classifier with the best setting applied, to be stored."""
    reached: Reached | None
    """With target_precision: what the updated classifier's thresholds reach."""
    twins: twins.Twins | None = None
    """Leave-one-out: the sampled exemplars' twins in the recommended setting's dimension."""


class Evaluator:
    def __init__(self, settings: Settings, embedder: EmbeddingPipeline, store: Store) -> None:
        self._limits = settings.limits
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store

    async def evaluate(self, config: ClassifierConfig, request: EvaluateRequest) -> Evaluation:
        """Evaluates ``config``'s sweep; with apply_best, proposes the classifier updated with
        the best setting. Writes nothing: storing the proposal is the caller's (the classifier
        may have changed or gone meanwhile)."""
        classifier = config.name
        sweep = self._sweep(config, request)
        held_out = request.held_out
        if len(held_out) > self._limits.max_evaluated:
            raise InvalidArgument(
                f"{len(held_out)} held-out texts; the limit is {self._limits.max_evaluated}"
            )
        for i, (text, label) in enumerate(held_out):
            validation.text(text, self._limits, f"held_out[{i}].text")
            if label is not None:
                validation.label(label, f"held_out[{i}].label")
        outside = [i for i, (_, label) in enumerate(held_out) if label is None]
        if held_out and len(outside) == len(held_out):
            raise InvalidArgument(
                "every held-out text is marked out of scope; send in-scope texts with labels too"
            )
        if request.apply_best and held_out:
            raise InvalidArgument("apply_best fits from leave-one-out: send no held_out texts")
        if request.target_precision is not None and not request.apply_best:
            raise InvalidArgument("target_precision needs apply_best")
        if request.target_precision is not None:
            validation.fraction(request.target_precision, "target_precision", 0.01, 1)
        if request.target_coverage is not None and not request.apply_best:
            raise InvalidArgument("target_coverage needs apply_best")
        target_coverage = (
            out_of_scope.DEFAULT_TARGET_COVERAGE
            if request.target_coverage is None
            else validation.fraction(request.target_coverage, "target_coverage", 0.5, 1)
        )

        stored = {d: await self._exemplars(classifier, d) for d in {s.dimension for s in sweep}}
        some = next(iter(stored.values()))
        if len(some.ids) < 2 or len(set(some.labels)) < 2:
            raise FailedPrecondition(
                f"classifier {classifier!r} has {len(some.ids)} exemplars in "
                f"{len(set(some.labels))} labels; evaluating needs at least two of each"
            )
        rng = np.random.default_rng(0)
        count = min(len(some.ids), self._limits.max_evaluated)
        sample_ids = [some.ids[i] for i in sorted(rng.choice(len(some.ids), count, False))]
        if held_out:
            prompts = [self._embedder.prompt(config.instruction, text) for text, _ in held_out]
            embedded = await self._embedder.bulk.embed(prompts)
            labelled = [label for _, label in held_out]
        else:
            by_id = dict(zip(some.ids, some.labels, strict=True))
            labelled = [by_id[i] for i in sample_ids]
        truth = [label for label in labelled if label is not None]

        results: list[Evaluated] = []
        largest_k = max(s.k for s in sweep)
        if held_out:  # the out-of-scope score's neighbour agreement
            largest_k = max(largest_k, open_set.AGREEMENT_NEIGHBOURS)
        samples: dict[int, npt.NDArray[np.intp]] = {}
        found: dict[int, twins.Twins] = {}
        for dimension, exemplars in stored.items():
            position = {exemplar_id: i for i, exemplar_id in enumerate(exemplars.ids)}
            samples[dimension] = np.asarray([position[i] for i in sample_ids], dtype=np.intp)
            if held_out:
                queries, self_index = truncate(embedded, dimension), None
            else:
                self_index = samples[dimension]
                queries = exemplars.vectors[self_index]
            indices, similarities = await asyncio.to_thread(
                neighbours.nearest, queries, exemplars.vectors, largest_k, self_index
            )
            vetoed = await asyncio.to_thread(exemplars.vetoed, queries, similarities[:, 0])
            if self_index is not None:
                found[dimension] = await asyncio.to_thread(
                    twins.leave_out, exemplars.vectors, exemplars.labels, self_index, largest_k
                )
            label_scores = await self._label_scores(sweep, exemplars, queries, self_index)
            scope = None
            if held_out and (outside or _rule_for(config, dimension)):
                scope = await self._scope(
                    config, exemplars, samples[dimension], queries, indices, similarities,
                    target_coverage,
                )  # fmt: skip
            for swept in (s for s in sweep if s.dimension == dimension):
                deadlines.check("the next setting of the sweep")
                scores = label_scores.get(swept.voting)
                setting = swept
                if scores is not None and not held_out:
                    setting = await asyncio.to_thread(with_fitted_temperature, swept, scores, truth)
                evaluated = await asyncio.to_thread(
                    self._evaluated,
                    config,
                    setting,
                    exemplars,
                    indices,
                    similarities,
                    scores,
                    labelled,
                    bool(held_out),
                    scope,
                    vetoed,
                )
                if dimension in found:
                    evaluated = await asyncio.to_thread(
                        self._twin_aware, evaluated, config, exemplars, found[dimension],
                        scores, labelled, vetoed, request.leave_out_twins,
                    )  # fmt: skip
                results.append(evaluated)
        results.sort(key=lambda r: (-r.report.accuracy, -r.report.macro_f1))
        results = recommended_first(results, truth)

        updated, reached = None, None
        if request.apply_best:
            updated, reached = await asyncio.to_thread(
                choice.proposal, config, results[0], truth, request.target_precision
            )
            dimension = results[0].report.setting.dimension
            rule = await _fitted_rule(stored[dimension], samples[dimension], target_coverage)
            updated = dataclasses.replace(updated, out_of_scope=rule)
        unknown_labels = sorted(set(truth) - set(some.labels)) if held_out else []
        count = len(some.ids) + len(some.negatives)
        return Evaluation(
            [r.report for r in results],
            unknown_labels,
            count,
            updated,
            reached,
            found.get(results[0].report.setting.dimension),
        )

    def _sweep(self, config: ClassifierConfig, request: EvaluateRequest) -> list[Setting]:
        """The settings of the request's sweep, each once.

        Every list is bounded and deduplicated, and the sweep's size counted, before any
        combination is made: expanding first let a 15 KB request of repeated values make
        millions of combinations on the event loop.
        """
        limit = self._limits.max_sweep
        lists: dict[str, Sequence[object]] = {
            "k": request.k,
            "voting": request.voting,
            "dimension": request.dimension,
            "temperature": request.temperature,
        }
        for name, values in lists.items():
            if len(values) > limit:
                raise InvalidArgument(
                    f"{name} lists {len(values)} values; the limit is {limit} per list"
                )
        ks = _distinct(validation.k(k, self._limits) for k in request.k) or [config.k]
        votings = _distinct(request.voting) or [config.voting]
        dimensions = _distinct(
            validation.dimension(d, self._dimensions) for d in request.dimension
        ) or [config.dimension or self._dimensions[-1]]
        temperatures = _distinct(validation.temperature(t) for t in request.temperature) or [
            config.temperature
        ]

        def ks_of(voting: Voting) -> list[int]:
            return ks[:1] if voting in LABEL_SCORED else ks  # k does not change their scores

        def temperatures_of(voting: Voting) -> list[float]:
            return temperatures if voting in _TEMPERED else [config.temperature]

        size = len(dimensions) * sum(len(ks_of(v)) * len(temperatures_of(v)) for v in votings)
        if size > limit:
            raise InvalidArgument(f"the sweep has {size} settings; the limit is {limit}")
        return [
            Setting(k, voting, dimension, t, config.label_temperature)
            for dimension in dimensions
            for voting in votings
            for k in ks_of(voting)
            for t in temperatures_of(voting)
        ]

    @staticmethod
    async def _label_scores(
        sweep: Sequence[Setting],
        exemplars: Exemplars,
        queries: Matrix,
        self_index: npt.NDArray[np.intp] | None,
    ) -> dict[Voting, tuple[list[str], Matrix]]:
        """The label model scores of the sweep's methods that need them, each model once."""
        by_model: dict[object, tuple[list[str], Matrix]] = {}
        scores = {}
        for voting in sorted(set(label_models.FIT) & {s.voting for s in sweep}):
            model = label_models.FIT[voting]
            if model not in by_model:
                by_model[model] = await asyncio.to_thread(
                    neighbours.label_scores, voting, exemplars, queries, self_index
                )
            scores[voting] = by_model[model]
        return scores

    @staticmethod
    async def _scope(
        config: ClassifierConfig,
        exemplars: Exemplars,
        sample: npt.NDArray[np.intp],
        queries: Matrix,
        indices: npt.NDArray[np.intp],
        similarities: Matrix,
        target_coverage: float,
    ) -> Scope | None:
        """The out-of-scope scores of held-out ``queries`` under the classifier's rule for this
        dimension, or else the rule apply_best would fit (None with too few exemplars)."""
        dimension = exemplars.vectors.shape[1]
        rule = _rule_for(config, dimension) or await _fitted_rule(
            exemplars, sample, target_coverage
        )
        if rule is None or len(exemplars.ids) < out_of_scope.MIN_EXEMPLARS:
            return None
        model = await asyncio.to_thread(open_set.fit, exemplars.labels, exemplars.vectors)
        labels = [[exemplars.labels[i] for i in row] for row in indices.tolist()]
        scores = out_of_scope.scores(model, rule, queries, similarities[:, 0].tolist(), labels)
        return Scope(rule, scores)

    @classmethod
    def _twin_aware(
        cls,
        plain: Evaluated,
        config: ClassifierConfig,
        exemplars: Exemplars,
        found: twins.Twins,
        label_scores: tuple[list[str], Matrix] | None,
        labelled: Sequence[str | None],
        vetoed: npt.NDArray[np.bool_],
        leave_out_twins: bool,
    ) -> Evaluated:
        """The same setting as ``plain`` (leave-one-out) evaluated with each exemplar's twins
        left out with it (:mod:`.twins`; the label models keep them), or ``plain`` itself if
        not ``leave_out_twins``: what ranks the settings and feeds apply_best's fits. Its
        report gives both accuracies.

        Twins answer for each other, not for new texts: their votes overrate the small k that
        reaches them and the confidences they give (docs/design.md)."""
        without = cls._evaluated(
            config, plain.report.setting, exemplars, found.indices, found.similarities,
            label_scores, labelled, False, None, vetoed,
        )  # fmt: skip
        chosen = without if leave_out_twins else plain
        report = dataclasses.replace(
            chosen.report,
            accuracy_without_twins=without.report.accuracy,
            accuracy_with_twins=plain.report.accuracy,
        )
        return dataclasses.replace(chosen, report=report)

    async def _exemplars(self, classifier: str, dimension: int) -> Exemplars:
        return await stored_exemplars(self._store, classifier, dimension)

    @staticmethod
    def _evaluated(
        config: ClassifierConfig,
        setting: Setting,
        exemplars: Exemplars,
        indices: npt.NDArray[np.intp],
        similarities: Matrix,
        label_scores: tuple[list[str], Matrix] | None,
        labelled: Sequence[str | None],
        held_out: bool,
        scope: Scope | None = None,
        vetoed: npt.NDArray[np.bool_] | None = None,
    ) -> Evaluated:
        """The answers under ``setting`` with the classifier's thresholds, and their report
        (``labelled``: each text's label, None for one out of scope).

        Held out, the classifier's calibration applies if it was fitted for this setting, and
        ``scope``'s out-of-scope rule to every text. Leave-one-out, confidences are calibrated
        by two-fold cross-fitting (each half by a calibration fitted on the other), which is
        what apply_best would give, measured honestly. Also keeps the uncalibrated shares, which
        apply_best fits its calibration on. The report and the answers kept are the in-scope
        texts'; the out-of-scope texts are measured in the report's ``out_of_scope``. Texts
        ``vetoed`` by a negative exemplar are answered unknown, as Classify answers them.
        """
        current = Setting(
            config.k,
            config.voting,
            config.dimension or setting.dimension,
            config.temperature,
            config.label_temperature,
        )
        calibration = config.calibration if held_out and setting == current else None
        raw = votes.outcomes(
            exemplars,
            indices,
            similarities,
            setting,
            config.min_similarity,
            calibration,
            label_scores,
        )
        truth = [label for label in labelled if label is not None]
        confidences = [o.confidence for o in raw] if held_out else cross_fitted(raw, truth)
        kept = scope.kept if scope else np.ones(len(raw), dtype=bool)
        if vetoed is not None:
            kept = kept & ~vetoed
        answers = [
            Outcome(
                o.label if c >= config.min_confidence and keep else None,
                o.best_label,
                c,
                o.top_similarity,
            )
            for o, c, keep in zip(raw, confidences, kept.tolist(), strict=True)
        ]
        inside = [i for i, label in enumerate(labelled) if label is not None]
        outcomes = [answers[i] for i in inside]
        report = metrics.report(setting, truth, outcomes)
        if scope is not None and len(inside) < len(labelled):
            report = dataclasses.replace(
                report, out_of_scope=metrics.out_of_scope_metrics(labelled, answers, scope)
            )
        barred = (
            frozenset() if vetoed is None else frozenset(np.flatnonzero(vetoed[inside]).tolist())
        )
        return Evaluated(report, outcomes, [raw[i].confidence for i in inside], barred)
