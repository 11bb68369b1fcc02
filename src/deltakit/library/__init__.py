"""A library of adapters: a content-addressed store with a SQLite index and routing data
(Arrow prototypes, a clustering embedding) computed at registration.

See :class:`AdapterLibrary`; the maths of the routing data is in :mod:`._routing`.
"""
from ._index import SCHEMA_VERSION, Entry, LibraryError
from ._routing import EMBEDDING_DIM, layer_sketch, projection, prototype, routing_data
from .library import AdapterLibrary, VerifyReport

__all__ = ["AdapterLibrary", "Entry", "LibraryError", "VerifyReport", "SCHEMA_VERSION", "EMBEDDING_DIM",
           "prototype", "layer_sketch", "projection", "routing_data"]
