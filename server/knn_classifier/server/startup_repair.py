"""Start-up's checks and repairs of the stored data, once the embedder and the store answer.

Unlike ``startup`` (files, the listening port, the gate that holds calls while starting), this
is about the data: the store's vectors must come from this embedder (its fingerprint), new
dimensions are filled, deletes interrupted by a crash are finished, and exemplars missing from
some dimensions are completed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from .classifiers import Classifiers
from .domain import ClassifierConfig
from .embedding_pipeline import EmbeddingPipeline
from .errors import Aborted, NotFound, ResourceExhausted, StartupError, Unavailable
from .leases import redone_if_lease_lost
from .progress import Progress
from .settings import Settings
from .store import Selection, Store
from .store.base import Payload
from .vectors import Fingerprint, truncate

log = logging.getLogger(__name__)

FINGERPRINT_KEY = "embedder-fingerprint"
_REPAIR_BATCH = 512
"""Exemplars read, embedded and written together by the start-up repair."""
MIGRATION_HINT = (
    "move the data to this embedder: copy it into a new store with knn-classifier-migrate "
    "(README, 'Moving to another embedder')"
)


class StartupRepair:
    """Brings the stored data in line with the embedder and the configured dimensions.

    ``delete`` deletes a selection from every dimension and returns how many exemplars it held
    (the service's own delete, so start-up deletes exactly as DeleteClassifier does).
    """

    def __init__(
        self,
        settings: Settings,
        embedder: EmbeddingPipeline,
        store: Store,
        classifiers: Classifiers,
        delete: Callable[[Selection], Awaitable[int]],
    ) -> None:
        self._settings = settings
        self._dimensions = settings.dimensions
        self._embedder = embedder
        self._store = store
        self._classifiers = classifiers
        self._delete = delete

    async def start(self) -> None:
        """Probes the embedder, opens the store and checks that both agree with the data."""
        width = await self._embedder.client.probe()
        too_wide = [d for d in self._dimensions if d > width]
        if too_wide:
            fitting = [d for d in self._dimensions if d <= width] or [width]
            raise StartupError(
                f"dimensions {too_wide} exceed the width {width} of the embedding model "
                f"{self._settings.embedding.model!r}; set KNN_DIMENSIONS to values up to {width}, "
                f"e.g. KNN_DIMENSIONS={','.join(map(str, fitting))}"
            )
        try:
            await self._store.open(self._dimensions)
        except Unavailable as exc:
            raise StartupError(f"{exc}; start it or check KNN_STORE__URL") from exc
        try:
            filling = await self._check_fingerprint(self._embedder.fingerprint)
            if upgraded := await self._classifiers.upgrade():
                log.info("gave %d classifier record(s) their revision", upgraded)
            for config in await self._classifiers.deleting():
                async with self._classifiers.deleting_classifier(config.name):
                    deleted = await self._delete(Selection(config.name))
                log.warning("finished deleting classifier %s (%d exemplars)", config.name, deleted)
            repaired = await self.repair()
            if filling:  # only now: a fill interrupted by a crash resumes at the next start
                await self._record_fingerprint(self._embedder.fingerprint)
        except (Unavailable, ResourceExhausted) as exc:
            raise StartupError(
                f"start-up could not check or repair the stored data: {exc}"
            ) from exc
        if filling:
            log.warning("filled the new dimensions %s: wrote %d vector(s)", filling, repaired)
        elif repaired:
            log.warning("repaired %d exemplar(s) missing from some dimensions", repaired)
        log.info("embedder width %d; dimensions %s", width, self._dimensions)

    async def _check_fingerprint(self, current: Fingerprint) -> list[int]:
        """Refuses to start on exemplars without a classifier record, or on vectors of another
        embedder; records the fingerprint if it changed.

        Returns the configured dimensions the stored exemplars have no vectors in yet, emptied
        for :meth:`repair` to fill; they are recorded as ``filling`` until it has.
        """
        recorded = await self._store.get_meta(FINGERPRINT_KEY)
        records = {str(p["name"]) for p in await self._store.list_meta("classifier")}
        held: dict[str, int] = {}  # classifier -> exemplars, in the dimension holding most
        for dimension in self._dimensions:
            for name, count in (await self._store.classifier_counts(dimension)).items():
                held[name] = max(held.get(name, 0), count)
        orphaned = sorted(set(held) - records)
        shown = ", ".join(f"{name!r} ({held[name]} exemplars)" for name in orphaned[:5])
        more = f" and {len(orphaned) - 5} more" if len(orphaned) > 5 else ""
        if orphaned and self._settings.store.delete_orphaned_exemplars:
            for name in orphaned:
                await self._delete(Selection(name))
                del held[name]
            log.warning("deleted exemplars without a classifier record: %s%s", shown, more)
        elif orphaned:
            raise StartupError(
                f"the store holds {sum(held[name] for name in orphaned)} exemplars of "
                f"{len(orphaned)} classifier(s) that have no classifier record: {shown}{more}. "
                "The records (the store's meta collection, edge/meta in the data directory) were "
                "lost; restore them from a backup. Starting without them would hide these "
                "exemplars and give them to any classifier created later under the same name; "
                "if the records are gone for good, start once with "
                "KNN_STORE__DELETE_ORPHANED_EXEMPLARS=true to delete the exemplars"
            )
        has_data = bool(records or held)
        filling: list[int] = []
        if recorded is not None and has_data:
            stored = Fingerprint.from_payload(recorded)
            if stored != current:
                raise StartupError(
                    f"the store holds vectors made by model={stored.model!r}, "
                    f"template={stored.template!r}, width={stored.width}, but this service "
                    f"embeds with model={current.model!r}, template={current.template!r}, "
                    f"width={current.width}; vectors of different embedders cannot be compared. "
                    f"Use the same embedder settings, or {MIGRATION_HINT}"
                )
            filling = sorted(set(self._dimensions) - set(recorded.get("dimensions", [])))
            if filling:
                await self._empty_for_filling(filling, recorded.get("filling", []))
        await self._record_fingerprint(current, recorded, filling)
        return filling

    async def _empty_for_filling(self, dimensions: list[int], interrupted: list[int]) -> None:
        """Empties the collections of new ``dimensions`` before they are filled, except those
        of a fill that was ``interrupted`` (they hold its progress). A dimension configured once,
        dropped and configured again still has its old collection, whose points missed every
        write since: left there, the repair would copy them into the other dimensions."""
        log.warning(
            "dimensions %s are new: filling them for the stored exemplars, from a wider stored "
            "vector where there is one, else by embedding the stored text",
            dimensions,
        )
        for dimension in sorted(set(dimensions) - set(interrupted)):
            for name in await self._store.classifier_counts(dimension):
                await self._store.delete(dimension, Selection(name))

    async def _record_fingerprint(
        self,
        current: Fingerprint,
        recorded: Payload | None = None,
        filling: Sequence[int] = (),
    ) -> None:
        """Records the embedder and the dimensions whose vectors are complete (and those being
        filled); writes nothing when ``recorded`` says the same already."""
        payload: dict[str, Any] = {
            **current.as_payload(),
            "kind": "fingerprint",
            "dimensions": [d for d in self._dimensions if d not in filling],
        }
        if filling:
            payload["filling"] = list(filling)
        if recorded is None or {k: v for k, v in recorded.items() if k != "key"} != payload:
            await self._store.put_meta(FINGERPRINT_KEY, payload)

    async def repair(self) -> int:
        """Completes exemplars missing from some dimensions: left so by an interrupted write or
        delete, or every exemplar in a newly configured dimension.

        A missing vector is the truncation of the exemplar's vector in a wider dimension where
        there is one, else the stored text is embedded again; dimensions are completed widest
        first, so a text is embedded once for all of them. Progress is logged. Returns how many
        (exemplar, dimension) pairs were written.

        Each classifier found incomplete is completed as an exemplar write (:meth:`_repaired`):
        on a shared store under its write lease, so no other replica's write or delete of its
        exemplars is half done while the repair reads what is missing and writes it.
        """
        configs = await self._classifiers.all()
        missing = {c.name: _missing(await self._present(c.name)) for c in configs}
        total = sum(missing.values())
        if not total:
            return 0
        progress = Progress(log, "completing exemplars missing from some dimensions", total)
        return sum([await self._repaired(c, progress) for c in configs if missing[c.name]])

    async def _present(self, classifier: str) -> dict[int, set[str]]:
        """The point ids of ``classifier`` in each dimension."""
        return {d: await self._store.point_ids(d, classifier) for d in self._dimensions}

    async def _repaired(self, config: ClassifierConfig, progress: Progress) -> int:
        """Completes ``config``'s classifier; returns how many vectors were written.

        A classifier whose lease another replica holds past the wait (``Leases.take``: twice
        ``store.write_lease_s``) is skipped with a warning rather than waited for without end:
        that replica is writing it, start-up must not hang on it, and the next start of any
        replica completes what is still missing. A classifier deleted meanwhile is skipped."""
        try:
            return await redone_if_lease_lost(lambda _: self._repaired_locked(config, progress), "")
        except NotFound:
            log.info("classifier %s was deleted during start-up repair", config.name)
        except Aborted as exc:
            log.warning(
                "start-up repair skipped classifier %s, which another replica kept writing: %s; "
                "the next start-up completes its exemplars missing from some dimensions",
                config.name,
                exc,
            )
        return 0

    async def _repaired_locked(self, config: ClassifierConfig, progress: Progress) -> int:
        """:meth:`_repaired` under the classifier's lock and (on a shared store) its lease.

        What is missing is read again under the lease: a delete of another replica that was
        half done when :meth:`repair` looked has finished, so the points it removed are gone
        from every dimension and are not written back. The revision moves if anything was
        written (other replicas' models of the completed dimensions are then fitted again); if
        the classifier was deleted or re-created meanwhile, what was written is removed, as an
        AddExemplars does."""
        async with self._classifiers.writing(config.name, uid=config.uid) as current:
            held = await self._present(current.name)
            every = set().union(*held.values())
            written: set[str] = set()
            count = 0
            for dimension in sorted(held, reverse=True):
                missing = every - held[dimension]
                for source in sorted(held, reverse=True):
                    found = sorted(missing & held[source])
                    for start in range(0, len(found), _REPAIR_BATCH):
                        batch = found[start : start + _REPAIR_BATCH]
                        await self._complete(current, dimension, source, batch)
                        progress.advance(len(batch))
                    missing -= set(found)
                    held[dimension] |= set(found)
                    written |= set(found)
                    count += len(found)
            if not count:
                return 0
            try:
                await self._classifiers.bump(current)
            except NotFound:
                await self._delete(Selection(current.name, ids=sorted(written)))
                raise
        return count

    async def _complete(
        self, config: ClassifierConfig, dimension: int, source: int, ids: list[str]
    ) -> None:
        """Writes the points ``ids`` of ``source`` into ``dimension``."""
        records, vectors = await self._store.retrieve(source, ids)
        if source < dimension:
            prompts = [
                self._embedder.prompt(config.instruction, str(r.payload["text"])) for r in records
            ]
            vectors = await self._embedder.bulk.embed(prompts)
        await self._classifiers.keep_lease(config.name)
        await self._store.upsert(
            dimension,
            [r.id for r in records],
            truncate(vectors, dimension),
            [r.payload for r in records],
        )


def _missing(held: dict[int, set[str]]) -> int:
    """How many (exemplar, dimension) pairs ``held`` (point ids by dimension) lacks."""
    every = set().union(*held.values())
    return sum(len(every - ids) for ids in held.values())
