"""Vector stores behind one interface: embedded Qdrant Edge, or a Qdrant server.

The Qdrant server store lives in ``store.qdrant_server``, imported only when used: qdrant-client
takes about two seconds to import, which the embedded default need not pay at every start.
"""

from .base import Record, Selection, Store
from .edge import EdgeStore

__all__ = ["EdgeStore", "Record", "Selection", "Store"]
