"""Bulk import: rows in concurrent AddExemplars batches, resumable, with a summary.

Resumable because ids are derived from the text (or given): a re-run writes each row to the
same exemplar. Before sending, the classifier's exemplars are listed once, so that rows already
stored with the same label and metadata are skipped ("unchanged": no embedding call) and each
written row is reported as "added" (its id was not there) or "updated". A batch the server
rejects as INVALID_ARGUMENT is split in halves until the bad rows are alone, so one bad row
costs only itself; UNAVAILABLE, RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED are retried with
backoff, then the import stops (re-run it to resume).
"""

from __future__ import annotations

import random
import re
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any

from knn_classifier.v1 import classifier_pb2 as pb

from .._client import Client
from .._errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
)
from ._archive import pages
from ._progress import Progress
from ._rows import Rejected, Row

RETRIES = 5
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 8.0
_TRANSIENT = (UnavailableError, ResourceExhaustedError, DeadlineExceededError)
_POSITION = re.compile(r"^exemplars\[\d+\]\.")


@dataclass
class Summary:
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    duplicates: int = 0
    """Rows whose id (or, without one, text) a later row repeats: the later row wins."""
    rejected: list[Rejected] = field(default_factory=list)

    def reasons(self) -> list[tuple[str, int]]:
        """Rejection reasons, most frequent first."""
        return Counter(item.reason for item in self.rejected).most_common()

    def as_dict(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "updated": self.updated,
            "unchanged": self.unchanged,
            "duplicates": self.duplicates,
            "rejected": len(self.rejected),
            "reasons": dict(self.reasons()),
        }


def _key(row: Row) -> tuple[str, str]:
    return ("id", row.id) if row.id else ("text", row.text)


def latest_rows(rows: Iterable[Row]) -> tuple[list[Row], int]:
    """One row per exemplar, the last in the file winning (as within one AddExemplars call);
    and how many earlier rows were dropped for it. Without it, concurrent batches would race."""
    latest: dict[tuple[str, str], Row] = {}
    count = 0
    for row in rows:
        count += 1
        latest[_key(row)] = row
    return list(latest.values()), count - len(latest)


def _same(row: Row, stored: pb.Exemplar | None) -> bool:
    return (
        stored is not None
        and stored.text == row.text
        and stored.label == row.label
        and stored.out_of_scope == row.out_of_scope
        and dict(stored.metadata) == row.metadata
    )


@dataclass
class _Outcome:
    """What one batch did: the ids written, the rows the server refused."""

    written: list[str] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


class Importer:
    def __init__(
        self,
        client: Client,
        classifier: str,
        *,
        batch_size: int,
        concurrency: int,
        page_size: int,
        vectors_fingerprint: str = "",
    ) -> None:
        """``vectors_fingerprint``: send the rows' vectors (an export's), made by the embedder
        of this fingerprint; empty: send the texts only, for the server to embed."""
        self._client = client
        self._fingerprint = vectors_fingerprint
        self._classifier = classifier
        self._batch_size = batch_size
        self._concurrency = concurrency
        self._page_size = page_size

    def plan(self, rows: Sequence[Row], summary: Summary) -> tuple[list[Row], set[str]]:
        """The rows to send, and the ids stored before the import.

        A row is unchanged if the classifier holds an exemplar with its id (without one: its
        text) and the same label and metadata.
        """
        unique, summary.duplicates = latest_rows(rows)
        by_id: dict[str, pb.Exemplar] = {}
        by_text: dict[str, pb.Exemplar] = {}
        for page in pages(self._client, self._classifier, self._page_size):
            for exemplar in page:
                by_id[exemplar.id] = exemplar
                by_text.setdefault(exemplar.text, exemplar)
        to_send = [
            row
            for row in unique
            if not _same(row, by_id.get(row.id) if row.id else by_text.get(row.text))
        ]
        summary.unchanged = len(unique) - len(to_send)
        return to_send, set(by_id)

    def run(self, rows: Sequence[Row], existed: set[str], summary: Summary, bar: Progress) -> None:
        """Sends ``rows`` in batches, at most ``concurrency`` in flight, counting into
        ``summary`` as batches finish; a failure that retries do not cure is raised after the
        batches in flight have finished (their rows counted)."""
        batches = [rows[i : i + self._batch_size] for i in range(0, len(rows), self._batch_size)]
        failure: BaseException | None = None

        def collect(done: Iterable[Future[_Outcome]]) -> None:
            nonlocal failure
            for future in done:
                try:
                    outcome = future.result()
                except Exception as error:
                    failure = failure or error
                    continue
                for exemplar_id in outcome.written:
                    if exemplar_id in existed:
                        summary.updated += 1
                    else:
                        summary.added += 1
                summary.rejected.extend(outcome.rejected)
                bar.update(len(outcome.written) + len(outcome.rejected))

        with ThreadPoolExecutor(self._concurrency, thread_name_prefix="import") as pool:
            in_flight: set[Future[_Outcome]] = set()
            for batch in batches:
                if len(in_flight) >= self._concurrency:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    collect(done)
                if failure is not None:
                    break
                in_flight.add(pool.submit(self._send, batch))
            collect(wait(in_flight).done)
        if failure is not None:
            raise failure

    def _send(self, rows: Sequence[Row]) -> _Outcome:
        """Adds ``rows``; if the server refuses the batch, halves it to find the bad rows."""
        try:
            ids = self._add(rows)
        except InvalidArgumentError as error:
            if len(rows) == 1:
                reason = f"{error.code.name}: {_POSITION.sub('', error.details)}"
                return _Outcome(rejected=[Rejected(rows[0].line, reason, rows[0].original)])
            middle = len(rows) // 2
            first, second = self._send(rows[:middle]), self._send(rows[middle:])
            return _Outcome(first.written + second.written, first.rejected + second.rejected)
        return _Outcome(written=ids)

    def _add(self, rows: Sequence[Row]) -> list[str]:
        """AddExemplars, retried with backoff while the server is down, busy or slow."""
        attempt = 0
        while True:
            try:
                return self._client.add_exemplars(
                    self._classifier,
                    [r.exemplar(with_vectors=bool(self._fingerprint)) for r in rows],
                    embedder_fingerprint=self._fingerprint,
                )
            except _TRANSIENT as error:
                attempt += 1
                # A full classifier or an oversized batch stays so: only what the server says
                # may pass (a retry hint) or a deadline or a lost connection is retried.
                hopeless = isinstance(error, ResourceExhaustedError) and not error.retryable
                if hopeless or attempt == RETRIES:
                    raise
                delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (attempt - 1))
                time.sleep(delay * random.uniform(0.5, 1.0))
