"""The embedded store's shards on disk: opening them, one guard around every Edge call, and the
free-space reserve writes keep.

Faults. Any exception out of Edge, a Rust panic included (PyO3's ``PanicException`` derives
from BaseException, so ``except Exception`` misses it), means a shard's files or the engine's
state are damaged: it becomes :class:`Unavailable` naming the shard, and from then on the store
refuses every call (its health check fails) until the process restarts, instead of writing on
into a damaged shard (a shard closed under a call, a worker thread's read as the service stops,
fails that call alone). Edge writes through memory-mapped files, so a full disk would kill the
process with SIGBUS: a write is refused with :class:`ResourceExhausted` when the file system
would keep less than ``min_free_bytes`` free after it. Opening writes too (WAL replay, index
files), so the store opens only with half that reserve free: after writes stopped at the
reserve, a restart still opens and serves reads.
A shard that cannot be opened (damaged, locked by another process, not writable) is a
:class:`StartupError` naming it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import qdrant_edge as qe

from ..errors import Reason, ResourceExhausted, StartupError, Unavailable
from .schema import CLASSIFIER, LABEL, OUT_OF_SCOPE

log = logging.getLogger(__name__)

_MIB = 2**20
_REMEDY = (
    "restore the data directory from a backup, or move a damaged dimension shard (d<N>) aside "
    "and start again: start-up rebuilds it from the other dimensions"
)
# What an Edge call may raise that is not Edge's failure: these propagate unchanged.
_NOT_EDGE_FAILURES = (KeyboardInterrupt, SystemExit, asyncio.CancelledError, GeneratorExit)


class EdgeShards:
    """The shards under ``root``: ``d<dimension>/`` per dimension and ``meta/``."""

    def __init__(self, root: Path, min_free_bytes: int) -> None:
        self.root = root
        self._min_free = min_free_bytes
        self._shards: dict[int, qe.EdgeShard] = {}
        self._meta: qe.EdgeShard | None = None
        self._broken: str | None = None
        """Why the store is out of service (see the module docstring), or None."""
        self._low_on_space = False

    def open(self, dimensions: Sequence[int]) -> None:
        self._check_data_dir()
        try:
            self._meta = self._open_shard("meta", 1, indexed=False)
            for dimension in dimensions:
                self._shards[dimension] = self._open_shard(f"d{dimension}", dimension)
        except BaseException:
            self.close()  # release the shards already open, and their locks
            raise

    def close(self) -> None:
        shards = [(f"d{dimension}", shard) for dimension, shard in self._shards.items()]
        if self._meta is not None:
            shards.append(("meta", self._meta))
        for name, shard in shards:
            try:
                shard.flush()
                shard.close()
            except _NOT_EDGE_FAILURES:
                raise
            except BaseException as exc:  # a damaged shard: close the others all the same
                log.error("closing the embedded store shard %s failed: %r", self.root / name, exc)
        self._shards.clear()
        self._meta = None

    def _check_data_dir(self) -> None:
        """Fails start-up, naming the directory and what to do, where Edge could not work."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StartupError(
                f"cannot create the data directory {self.root} ({exc.strerror}); set "
                "KNN_DATA_DIR to a directory the service can write"
            ) from exc
        if not os.access(self.root, os.W_OK):
            raise StartupError(
                f"the data directory {self.root} is not writable (read-only file system or "
                "permissions); make it writable for the service's user, or set KNN_DATA_DIR to "
                "a writable directory"
            )
        free = _free_bytes(self.root)
        if free < self._min_free // 2:
            raise StartupError(
                f"the disk of the data directory {self.root} has {free / _MIB:.1f} MiB free, "
                f"less than the {self._min_free / 2 / _MIB:.1f} MiB the embedded store needs to "
                "open (half its reserve, KNN_STORE__MIN_FREE_BYTES); free disk space there, or "
                "move KNN_DATA_DIR to a larger disk"
            )

    def _open_shard(self, name: str, size: int, *, indexed: bool = True) -> qe.EdgeShard:
        path = self.root / name
        config = qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=size, distance=qe.Distance.Cosine))
        try:
            if (path / "wal").exists():
                shard = qe.EdgeShard.load(str(path), config)
                if indexed:
                    _ensure_out_of_scope_index(shard, path)
                return shard
            shard = qe.EdgeShard.create(str(path), config)
            if indexed:
                shard.update(
                    qe.UpdateOperation.create_field_index(
                        CLASSIFIER, qe.KeywordIndexParams(is_tenant=True)
                    )
                )
                shard.update(
                    qe.UpdateOperation.create_field_index(LABEL, qe.PayloadSchemaType.Keyword)
                )
                _ensure_out_of_scope_index(shard, path)
        except _NOT_EDGE_FAILURES:
            raise
        except BaseException as exc:
            raise StartupError(_open_failure(path, exc)) from exc
        log.info("created embedded shard %s (size %d)", path, size)
        return shard

    @contextmanager
    def using(self, dimension: int | None) -> Iterator[qe.EdgeShard]:
        """The shard of ``dimension`` (None: meta) for Edge calls; see the module docstring."""
        if self._broken is not None:
            raise Unavailable(self._broken)
        shard = self._meta if dimension is None else self._shards.get(dimension)
        name = "meta" if dimension is None else f"d{dimension}"
        if shard is None:
            raise RuntimeError(f"the embedded store has no open shard {name}")
        try:
            yield shard
        except _NOT_EDGE_FAILURES:
            raise
        except BaseException as exc:
            if shard is not self._meta and shard not in self._shards.values():
                # Closed under a call in a worker thread (the service stopping): not damage.
                raise Unavailable(
                    "the embedded store was closed during this call (the service is stopping); "
                    "retry"
                ) from exc
            path = self.root / name
            log.error(
                "the embedded store shard %s failed: %r; the store refuses every call until the "
                "service restarts",
                path,
                exc,
            )
            self._broken = (
                f"the embedded store failed in {path} (details in the server log) and is out of "
                "service until the service restarts; if it fails again, that shard's files are "
                f"damaged: {_REMEDY}"
            )
            raise Unavailable(self._broken) from exc

    def ensure_room(self, size: int | None) -> None:
        """Refuses a write that would eat into the free-space reserve: an addition of about
        ``size`` bytes, or a deletion (None). A deletion writes a WAL record and a flag per
        point and may use the reserve's first half, so that a refused write can be rolled back
        where other dimensions took it."""
        free = _free_bytes(self.root)
        if size is None:
            if free >= self._min_free // 2:
                return
        elif free - size >= self._min_free:
            if self._low_on_space:
                log.warning("the data directory's disk has room again; writes are accepted")
                self._low_on_space = False
            return
        if not self._low_on_space:
            log.warning(
                "the disk of %s has %.1f MiB free, within the reserve of %.1f MiB "
                "(KNN_STORE__MIN_FREE_BYTES): writes are refused until there is room; reads go on",
                self.root,
                free / _MIB,
                self._min_free / _MIB,
            )
            self._low_on_space = True
        raise ResourceExhausted(
            f"the data directory's disk is nearly full ({free / _MIB:.1f} MiB free; the store "
            f"keeps {self._min_free / _MIB:.1f} MiB in reserve), so this write was refused and "
            "nothing was written; free disk space on the server, then retry. Reads and deletes "
            "go on",
            reason=Reason.STORAGE_FULL,
            metadata={"freeBytes": free, "reserveBytes": self._min_free},
        )


def _ensure_out_of_scope_index(shard: qe.EdgeShard, path: Path) -> None:
    """Indexes ``out_of_scope`` if the shard has no index of it (a shard created before negative
    exemplars existed): its filters test whether the key is there, which without an index
    reads every point's payload (docs/design.md, "Negative exemplars")."""
    if OUT_OF_SCOPE not in shard.info().payload_schema:
        shard.update(qe.UpdateOperation.create_field_index(OUT_OF_SCOPE, qe.PayloadSchemaType.Bool))
        log.info("indexed %s in the embedded shard %s", OUT_OF_SCOPE, path)


def _free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def _open_failure(path: Path, exc: BaseException) -> str:
    """What to tell the operator when Edge cannot open the shard at ``path``."""
    detail = str(exc)
    if "WouldBlock" in detail:  # the WAL's directory lock is held
        return (
            f"the embedded store at {path} is locked by another process (another knn-classifier "
            "on the same data directory?); stop it, or give each instance its own KNN_DATA_DIR"
        )
    if "os error 30" in detail or "os error 13" in detail:  # EROFS, EACCES
        return (
            f"the embedded store at {path} is not writable ({detail}); make the data directory "
            "writable for the service's user, or set KNN_DATA_DIR to a writable directory"
        )
    return f"the embedded store at {path} cannot be opened ({detail}); it is damaged: {_REMEDY}"
