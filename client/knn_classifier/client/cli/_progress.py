"""Progress bars on stderr (tqdm, from the ``cli`` extra), with rate and time left."""

from __future__ import annotations

import sys
from typing import Protocol

# The client is installed from the repository (it is not on a package index under its name).
HINT = (
    "knn-classifier: no progress bar without tqdm; install it with: pip install tqdm "
    "(or install the client as pip install './client[cli]' from the repository)"
)


class Progress(Protocol):
    def update(self, n: float | None = 1) -> bool | None: ...

    def close(self) -> None: ...


class _Silent:
    def update(self, n: float | None = 1) -> bool | None:
        return None

    def close(self) -> None:
        pass


def bar(total: int, unit: str, description: str, show: bool | None) -> Progress:
    """A bar counting to ``total``; ``show`` None: only when stderr is a terminal."""
    wanted = sys.stderr.isatty() if show is None else show
    if not wanted:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        print(HINT, file=sys.stderr)
        return _Silent()
    return tqdm(total=total, unit=unit, desc=description, file=sys.stderr, dynamic_ncols=True)
