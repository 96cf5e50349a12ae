"""Cross-replica write leases: one writer of a classifier's exemplars at a time, across service
replicas sharing a Qdrant server (docs/design.md, "Classifier records").

A lease is two fields of the classifier's record: ``lease``, the random token of its last taker,
and ``lease_until``, when it expires (seconds since the epoch on the taker's clock; 0 once
released). A replica takes it by compare-and-set on the token it saw, when the lease is released
or expired, and holds it from before its first point write to its final revision bump, whose
compare-and-set includes the token and releases the lease in the same step. Tokens are never
reused, so a holder whose lease expired and was taken by another replica finds out before its
next store write, by its own clock (:meth:`Leases.renewed`, which also extends a lease half
gone, so a write may last longer than one lease), or at that final compare-and-set: it then
raises :class:`LeaseLost` and its write is done again under a new lease
(:func:`redone_if_lease_lost`).

Within one process the per-name lock of :class:`~.classifiers.Classifiers` already serialises
writes; the lease is taken under it. Stores used by one process only (the embedded store) take
no lease at all (:attr:`Store.shared`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from . import deadlines, errors
from .domain import ClassifierConfig, classifier_key
from .errors import Aborted, NotFound, Reason
from .store import Store
from .store.base import Payload

T = TypeVar("T")
log = logging.getLogger(__name__)

LEASE = "lease"
"""Record field: the token of the lease's last taker (absent on a record never leased)."""
LEASE_UNTIL = "lease_until"
"""Record field: when the lease expires, in seconds since the epoch; 0 once released."""

_FIRST_POLL_S = 0.01
_LAST_POLL_S = 0.25
_MAX_WAIT_LEASES = 2
"""A writer waits for a held lease at most this many lease durations: a crashed holder's lease
has expired by one; more means live writers keep taking it."""
_REDOS = 3
"""Times a write is done again after losing its lease before the call gives up."""


class LeaseLost(Aborted):
    """This replica's lease on a classifier expired and another replica took it during the
    write: the write must be done again under a new lease before it may be acknowledged."""

    default_reason = Reason.CLASSIFIER_BUSY
    default_retry_after_s = 1.0


@dataclass
class Lease:
    """A lease this replica holds on one classifier."""

    name: str
    token: str
    expires: float
    """When the lease ends by this process's monotonic clock, counted from before it was
    taken, so never later than the expiry other replicas see (clock skew aside)."""
    released: bool = False
    """Released, or gone with its classifier's record."""


class Leases:
    """Takes and releases the write leases of classifiers in ``store``'s records."""

    def __init__(self, store: Store, lease_s: float) -> None:
        self._store = store
        self._lease_s = lease_s

    async def take(self, config: ClassifierConfig, seen: Payload | None = None) -> Lease:
        """Takes the lease of ``config``'s classifier, waiting while another replica holds it:
        at most twice ``lease_s`` (a holder that crashed has let it expire after one) and not
        past the call's deadline. ABORTED (``CLASSIFIER_BUSY``, retryable) when the wait is
        over; NOT_FOUND if the classifier is deleted or re-created meanwhile. ``seen``: the
        record as just read, if the caller has it (saves reading it again)."""
        key = classifier_key(config.name)
        token = uuid.uuid4().hex
        left = deadlines.remaining()
        longest = _MAX_WAIT_LEASES * self._lease_s
        give_up = time.monotonic() + (longest if left is None else min(longest, left))
        poll = _FIRST_POLL_S
        payload = seen or await self._store.get_meta(key)
        while True:
            _check_same(config, payload)
            assert payload is not None
            held_for = float(payload.get(LEASE_UNTIL, 0)) - time.time()
            if held_for <= 0:  # released or expired: compare-and-set on the token seen
                started = time.monotonic()
                taken = {LEASE: token, LEASE_UNTIL: time.time() + self._lease_s}
                still = {**_identity(config), LEASE: payload.get(LEASE)}
                await self._store.update_meta(key, taken, still)
                payload = await self._store.get_meta(key)
                if payload is not None and payload.get(LEASE) == token:
                    return Lease(config.name, token, started + self._lease_s)
                if time.monotonic() >= give_up:
                    raise _busy(config.name)
                continue  # another replica took it first: look at its lease
            wait = min(poll, held_for, give_up - time.monotonic())
            if wait <= 0:
                raise _busy(config.name)
            await asyncio.sleep(wait)
            poll = min(poll * 2, _LAST_POLL_S)
            payload = await self._store.get_meta(key)

    async def renewed(self, lease: Lease) -> None:
        """Before a store write: extends ``lease`` if less than half of it is left, under a new
        token (a replica that saw the old one expiring cannot take the lease on it), so every
        store write starts with at least half a lease to run. A lease run out but not taken is
        extended too: its token unchanged proves that no other replica wrote meanwhile.
        LeaseLost if another replica took it. A record gone or being deleted is left to the
        write's final bump, which then removes what the write wrote."""
        if lease.released or lease.expires - time.monotonic() >= self._lease_s / 2:
            return
        key = classifier_key(lease.name)
        token = uuid.uuid4().hex
        started = time.monotonic()
        extended = {LEASE: token, LEASE_UNTIL: time.time() + self._lease_s}
        await self._store.update_meta(key, extended, {LEASE: lease.token})
        after = await self._store.get_meta(key)
        if after is None or after.get("deleting"):
            return
        if after.get(LEASE) != token:
            raise _lost(lease.name)
        lease.token, lease.expires = token, started + self._lease_s

    async def release(self, config: ClassifierConfig, lease: Lease) -> None:
        """Releases ``lease`` after a write that did not bump the revision (a delete of
        nothing); LeaseLost if another replica took it meanwhile."""
        key = classifier_key(config.name)
        await self._store.update_meta(key, {LEASE_UNTIL: 0}, {LEASE: lease.token})
        lease.released = True
        after = await self._store.get_meta(key)
        _check_same(config, after)
        assert after is not None
        if after.get(LEASE) != lease.token:
            raise _lost(config.name)

    async def release_quietly(self, config: ClassifierConfig, lease: Lease) -> None:
        """Releases ``lease`` after a failed write, if it is still this replica's; best
        effort (the store may be what failed): an unreleased lease expires."""
        with contextlib.suppress(errors.ServiceError):
            await self._store.update_meta(
                classifier_key(config.name), {LEASE_UNTIL: 0}, {LEASE: lease.token}
            )
        lease.released = True


async def redone_if_lease_lost(write: Callable[[str], Awaitable[T]], etag: str) -> T:
    """``write(etag)``, done again (with no etag) if it lost its lease to another replica.

    The etag was checked when the write first took its lease. A write done again comes after
    the writes of whichever replicas took the lease meanwhile, and writes every one of its points
    in every dimension again (or deletes its selection again), so what the lost lease let in
    between cannot leave the write in some dimensions only. It is not bounded by the caller's
    deadline: it finishes what this replica's late store write may have left.
    """
    with contextlib.suppress(LeaseLost):
        return await write(etag)
    log.warning(
        "a write lost its lease to another replica (it took longer than store.write_lease_s, or "
        "this process stalled); doing it again"
    )
    with deadlines.within(None):
        for _ in range(_REDOS - 1):
            with contextlib.suppress(LeaseLost):
                return await write("")
        return await write("")


def lease_fields(lease: Lease | None) -> tuple[Payload, Payload]:
    """What a revision bump by ``lease``'s holder adds to its compare-and-set: the condition
    that the lease is still its own, and its release. Empty without a lease."""
    if lease is None:
        return {}, {}
    return {LEASE: lease.token}, {LEASE_UNTIL: 0}


def check_not_lost(lease: Lease | None, config: ClassifierConfig, after: Payload | None) -> None:
    """After a failed compare-and-set by ``lease``'s holder: LeaseLost if it failed because
    another replica took the lease (rather than because the classifier is gone or its revision
    moved)."""
    if lease is None or after is None:
        return
    same = after.get("uid", "") == config.uid and not after.get("deleting", False)
    if same and after.get(LEASE) != lease.token:
        raise _lost(config.name)


def _identity(config: ClassifierConfig) -> Payload:
    where: Payload = {"deleting": False}
    if config.uid:
        where["uid"] = config.uid
    return where


def _check_same(config: ClassifierConfig, payload: Payload | None) -> None:
    """NOT_FOUND if the record is gone, being deleted, or another incarnation's."""
    if payload is None or payload.get("deleting") or payload.get("uid", "") != config.uid:
        raise NotFound(
            f"classifier {config.name!r} was deleted during the write",
            resource=errors.classifier(config.name),
        )


def _busy(name: str) -> Aborted:
    return Aborted(
        f"classifier {name!r} is being written by another replica of the service, which did "
        "not finish while this call could wait; retry",
        reason=Reason.CLASSIFIER_BUSY,
        resource=errors.classifier(name),
        retry_after_s=1.0,
    )


def _lost(name: str) -> LeaseLost:
    return LeaseLost(
        f"classifier {name!r} was taken over by another replica of the service while this one "
        "was writing it; retry",
        resource=errors.classifier(name),
    )
