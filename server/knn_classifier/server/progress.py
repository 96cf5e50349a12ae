"""Progress of long jobs (start-up's fill of a new dimension, the migration) as log lines."""

from __future__ import annotations

import logging
import time


class Progress:
    """Counts work done; logs ``what: done/total (rate/s)`` at most every ``every_s`` seconds,
    and always once the total is reached."""

    def __init__(self, log: logging.Logger, what: str, total: int, every_s: float = 5.0) -> None:
        self._log = log
        self._what = what
        self.total = total
        self.done = 0
        self._every_s = every_s
        self._started = self._reported = time.monotonic()

    def advance(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.done < self.total and now - self._reported < self._every_s:
            return
        self._reported = now
        rate = self.done / max(now - self._started, 1e-6)
        self._log.info("%s: %d/%d (%.0f/s)", self._what, self.done, self.total, rate)
