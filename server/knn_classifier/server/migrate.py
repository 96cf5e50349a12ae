"""``knn-classifier-migrate``: copies a deployment's data into a new store, side by side.

The target is the store the ``KNN_*`` settings describe (new embedder, dimensions, data dir or
collection prefix); the source is given by flags. Every classifier record (settings, calibration,
thresholds) and every exemplar (id, text, label, metadata, creation time) is copied through the
service's own write path (:meth:`ClassifierService.restore_classifier`,
:meth:`ClassifierService.restore_exemplars`), so the target keeps every invariant of the service.
Vectors are copied when the source was made by the target's embedder and is wide enough;
otherwise the stored texts are embedded again. Exemplars the target already holds are skipped, so
a run stopped by a crash or an error is continued by running it again. The source is only read.
The README's "Moving to another embedder" gives the whole procedure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError
from pydantic_settings import SettingsError

from . import logs
from .app import build_store
from .classifiers import Classifiers
from .domain import Exemplar
from .embedding import EmbeddingClient
from .embedding_pipeline import EmbeddingPipeline
from .errors import NotFound, ServiceError, StartupError
from .progress import Progress
from .service import ClassifierService
from .settings import Settings, invalid
from .startup_repair import FINGERPRINT_KEY
from .store import Selection, Store
from .transfer import carried
from .vectors import Fingerprint

log = logging.getLogger("knn_classifier.migrate")

RESTART_HINT = "start the old service on it once (its start-up completes them), then migrate"


class MigrationError(Exception):
    """A reason the migration cannot start or go on; the message says what to do."""


@dataclass(frozen=True)
class Source:
    """A store written by the service, opened to be read: its embedder and complete dimensions."""

    store: Store
    where: str
    fingerprint: Fingerprint
    dimensions: list[int]

    @classmethod
    async def open(cls, store: Store, where: str) -> Source:
        """Opens ``store`` (described by ``where`` in messages) without creating anything in it.

        Refuses a store with exemplars missing from some dimensions (an interrupted write or
        fill): its own service's start-up completes them, and only a complete store is copied.
        """
        existing = await store.existing_dimensions()
        if not existing:
            raise MigrationError(f"the source {where} holds no knn-classifier data")
        await store.open(existing)
        recorded = await store.get_meta(FINGERPRINT_KEY)
        if recorded is None:
            raise MigrationError(f"the source {where} has no embedder fingerprint; {RESTART_HINT}")
        dimensions = [d for d in existing if d in recorded.get("dimensions", [])]
        counts = [await store.classifier_counts(d) for d in dimensions]
        if not dimensions or recorded.get("filling") or any(c != counts[0] for c in counts):
            raise MigrationError(
                f"the source {where} has exemplars missing from some dimensions; {RESTART_HINT}"
            )
        return cls(store, where, Fingerprint.from_payload(recorded), dimensions)


@dataclass(frozen=True)
class Copied:
    """What the migration did for one classifier."""

    classifier: str
    exemplars: int
    written: int
    embedded: int
    notes: tuple[str, ...]


async def migrate(source: Source, target: ClassifierService, batch_size: int) -> list[Copied]:
    """Copies every classifier of ``source`` into the started ``target``, one after the other."""
    configs = await Classifiers(source.store).all()
    dimensions = target.info().dimensions
    for config in configs:  # before anything is written
        try:
            held = (await target.get_classifier(config.name)).config
        except NotFound:
            continue
        if held.instruction != config.instruction:
            raise MigrationError(
                f"the target already holds a classifier {config.name!r} with another "
                f"instruction ({held.instruction!r}, not {config.instruction!r}); delete it "
                "there or migrate into another store"
            )
    widest = source.dimensions[-1]
    copy_vectors = source.fingerprint == target.fingerprint and dimensions[-1] <= widest
    log.info(
        "migrating %d classifier(s) from %s; %s",
        len(configs),
        source.where,
        f"copying the vectors of dimension {widest}"
        if copy_vectors
        else "embedding the stored texts with the new embedder",
    )
    copied = []
    for config in configs:
        adapted, notes = carried(config, dimensions, copy_vectors, widest)
        restored = await target.restore_classifier(adapted)
        total = await source.store.count(widest, Selection(config.name))
        progress = Progress(log, f"classifier {config.name}", total)
        written = embedded = 0
        offset: str | None = None
        while True:
            records, offset = await source.store.scroll(
                widest, Selection(config.name), batch_size, offset
            )
            vectors = None
            if copy_vectors and records:
                records, vectors = await source.store.retrieve(widest, [r.id for r in records])
            exemplars = [Exemplar.stored(record) for record in records]
            if exemplars:
                done = await target.restore_exemplars(restored, exemplars, vectors)
                written, embedded = written + done[0], embedded + done[1]
                progress.advance(len(exemplars))
            if offset is None:
                break
        copied.append(Copied(config.name, progress.done, written, embedded, notes))
    return copied


async def run(settings: Settings, source_store: Store, where: str, batch_size: int) -> list[Copied]:
    """Opens the source and the target the settings describe, migrates, closes both."""
    try:
        source = await Source.open(source_store, where)
        target = ClassifierService(
            settings,
            EmbeddingPipeline.direct(EmbeddingClient(settings.embedding)),
            build_store(settings),
        )
        try:
            await target.start()
            return await migrate(source, target, batch_size)
        finally:
            await target.stop()
    finally:
        await source_store.close()


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="knn-classifier-migrate",
        description=(
            "Copy every classifier and exemplar from a SOURCE store into the store that the "
            "KNN_* settings describe (the new embedder, KNN_DIMENSIONS, KNN_DATA_DIR or "
            "KNN_STORE__URL / KNN_STORE__COLLECTION_PREFIX), re-embedding the texts unless "
            "the embedder is the same. Run it again to continue after an interruption."
        ),
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-data-dir", type=Path, help="the source's embedded store")
    source.add_argument(
        "--from-url",
        help="the source's Qdrant server (the target's KNN_STORE__API_KEY and gRPC port apply)",
    )
    parser.add_argument(
        "--from-prefix", default="knn", help="the source's collection prefix (default: knn)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=256, help="exemplars per step (default: 256)"
    )
    return parser.parse_args(argv)


def _source(settings: Settings, args: argparse.Namespace) -> tuple[Settings, str]:
    """Settings that describe the source store, and how to name it."""
    if args.from_data_dir is not None:
        source = settings.model_copy(
            update={
                "data_dir": args.from_data_dir,
                "store": settings.store.model_copy(update={"url": None}),
            }
        )
        where = f"data directory {args.from_data_dir}"
        same = settings.store.url is None and _same_path(args.from_data_dir, settings.data_dir)
    else:
        store = settings.store.model_copy(
            update={"url": args.from_url, "collection_prefix": args.from_prefix}
        )
        source = settings.model_copy(update={"store": store})
        where = f"Qdrant {args.from_url} (collections {args.from_prefix}_*)"
        same = (settings.store.url, settings.store.collection_prefix) == (
            args.from_url,
            args.from_prefix,
        )
    if same:
        raise MigrationError(
            f"the source {where} is the target; point KNN_DATA_DIR or "
            "KNN_STORE__COLLECTION_PREFIX at a new store"
        )
    return source, where


def _same_path(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def _report(copied: list[Copied], where: str, settings: Settings) -> str:
    target = (
        f"KNN_STORE__COLLECTION_PREFIX={settings.store.collection_prefix}"
        if settings.store.url
        else f"KNN_DATA_DIR={settings.data_dir}"
    )
    lines = [f"migrated {len(copied)} classifier(s) from {where}:"]
    for c in copied:
        lines.append(
            f"  {c.classifier}: {c.exemplars} exemplars, {c.written} written "
            f"({c.embedded} embedded), {c.exemplars - c.written} already there"
        )
        lines.extend(f"    note: {note}" for note in c.notes)
    lines += [
        "To switch over:",
        "  1. stop the old service (all replicas), then run this command again: it copies",
        "     what was added or changed since (deletions made meanwhile are not carried);",
        f"  2. start the service with {target} and the new KNN_EMBEDDING__* / KNN_DIMENSIONS;",
        "  3. check it (knn-classifier list, a few classify calls), then delete the old data:",
        f"     {where}.",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = _arguments(argv)
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        sys.exit(invalid.describe(exc))
    logs.configure(settings.log_level, settings.log_format)
    try:
        if args.batch_size < 1:
            raise MigrationError("--batch-size must be at least 1")
        source_settings, where = _source(settings, args)
        copied = asyncio.run(run(settings, build_store(source_settings), where, args.batch_size))
    except (MigrationError, StartupError, ServiceError) as exc:
        sys.exit(f"knn-classifier-migrate: {' '.join(str(exc).split())}")
    print(_report(copied, where, settings))


if __name__ == "__main__":
    main()
