"""``python -m knn_classifier.server``: runs the service until SIGTERM or SIGINT."""

from __future__ import annotations

import os

# Before numpy loads OpenBLAS: its worker threads spin between calls, and on a small machine
# they take a core from the event loop (docs/benchmarks.md). The service's matrix products are
# small.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import asyncio
import logging
import signal
import sys

from pydantic import ValidationError
from pydantic_settings import SettingsError

from . import logs
from .app import App
from .errors import StartupError
from .settings import Settings, invalid

log = logging.getLogger("knn_classifier.server")


async def serve(settings: Settings) -> None:
    app = App(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace period %gs)", settings.server.grace_period_s)
    await app.stop()


def main() -> None:
    try:
        settings = Settings()
    except (ValidationError, SettingsError) as exc:
        sys.exit(invalid.describe(exc))
    logs.configure(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except StartupError as exc:  # one line, no traceback: the message says what to change
        sys.exit(f"knn-classifier cannot start: {' '.join(str(exc).split())}")


if __name__ == "__main__":
    main()
