"""Logging set-up: readable text lines or JSON lines, and the request id of the current RPC.

JSON lines carry ``timestamp`` (ISO 8601, UTC), ``level``, ``logger``, ``message``, the fields a
record was given with ``extra=`` (the access log's method, status, duration...), the request id
of the RPC being served when the record was made, and ``exception`` with the traceback. Keys and
texts are never given to a log record above DEBUG.
"""

from __future__ import annotations

import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

request_id: ContextVar[str | None] = ContextVar("knn_request_id", default=None)
"""The id of the RPC being served (set by the telemetry interceptor for the call)."""

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        current = request_id.get()
        if current is not None:
            entry["request_id"] = current
        entry.update((k, v) for k, v in vars(record).items() if k not in _STANDARD)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(level: str, form: str) -> None:
    """Sends every log record to stderr at ``level``, as ``form`` ('text' or 'json') lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if form == "json" else logging.Formatter(TEXT_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for chatty in ("httpx", "httpx2"):  # one INFO line per embedding call otherwise
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.getLogger().level))
