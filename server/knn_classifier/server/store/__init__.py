"""Vector stores behind one interface: embedded Qdrant Edge, or a Qdrant server."""

from .base import Record, Selection, Store
from .edge import EdgeStore
from .qdrant_server import QdrantServerStore

__all__ = ["EdgeStore", "QdrantServerStore", "Record", "Selection", "Store"]
